//! What the placement cases found, against the budget: the lines of the budget, the markdown
//! table, `summary.json`'s part and the plot.

use std::fs;
use std::path::Path;

use anyhow::Context;
use serde_json::{Value, json};

use super::{
    LINK_CONNECTIONS, OVERLOAD_BASE_CONNECTIONS, OVERLOAD_CONNECTIONS, Placement, Point, Round,
    budget,
};
use crate::bench::budget::{Check, budget_table, median};
use crate::bench::plot;
use crate::util::root;

impl Placement {
    /// The median of the rounds' goodput ratios; NaN with no round, or when a round has no
    /// ratio (not one 200 at 64 connections): a broken round is not noise to outvote.
    fn goodput(&self) -> f64 {
        let mut ratios: Vec<f64> = self.rounds.iter().map(Round::goodput).collect();
        if ratios.iter().any(|r| !r.is_finite()) {
            return f64::NAN;
        }
        ratios.sort_by(f64::total_cmp);
        median(&ratios)
    }

    /// The storms' worst p99 of the 200s (NaN when a storm had no 200, or with no round).
    fn storm_p99_ms(&self) -> f64 {
        self.rounds
            .iter()
            .map(|r| r.storm.ok_p99_ms)
            .reduce(|a, b| {
                if a.is_nan() || b.is_nan() {
                    f64::NAN
                } else {
                    a.max(b)
                }
            })
            .unwrap_or(f64::NAN)
    }

    fn at(&self, rtt_ms: u64) -> Option<&Point> {
        self.distances
            .iter()
            .find(|(d, _)| d.rtt_ms == rtt_ms)
            .map(|(_, p)| p)
    }

    /// The placement lines of the budget, each compared within this run.
    pub(in crate::bench) fn checks(&self) -> Vec<Check> {
        let mut checks = Vec::new();
        let (near, far) = (self.at(0), self.at(50));
        checks.push(Check {
            line: format!(
                "Klaus over 50 ms vs co-located (both through the link), {LINK_CONNECTIONS} conns"
            ),
            figure: match (near, far) {
                (Some(n), Some(f)) => format!(
                    "{:.0} vs {:.0} × 200/s ({:.2}×)",
                    f.ok_rps,
                    n.ok_rps,
                    f.ok_rps / n.ok_rps
                ),
                _ => "not measured".into(),
            },
            limit: format!("≥ {:.1}× co-located", budget::DISTANCE_RATIO),
            pass: near
                .zip(far)
                .map(|(n, f)| f.ok_rps >= budget::DISTANCE_RATIO * n.ok_rps),
        });
        checks.push(Check {
            line: format!(
                "503s over 50 ms while Klaus's CPU is not saturated, {LINK_CONNECTIONS} conns"
            ),
            figure: far.map_or("not measured".into(), |f| {
                format!("{} × 503 ({})", f.status_503, f.cpu_figure())
            }),
            limit: format!(
                "0 unless saturated (Klaus's thread on a core or waiting for one ≥ {:.0} % of the time)",
                budget::SATURATED * 100.0
            ),
            pass: far.map(|f| f.saturated() || f.status_503 == 0),
        });
        let goodput = self.goodput();
        let ratios = self
            .rounds
            .iter()
            .map(|r| format!("{:.2}", r.goodput()))
            .collect::<Vec<_>>()
            .join(", ");
        let storms_503: u64 = self.rounds.iter().map(|r| r.storm.status_503).sum();
        checks.push(Check {
            line: format!(
                "Goodput under overload, co-located: 200s at {OVERLOAD_CONNECTIONS} vs {OVERLOAD_BASE_CONNECTIONS} conns, median of {} rounds",
                self.rounds.len()
            ),
            figure: format!("{goodput:.2}× (rounds {ratios}; {storms_503} × 503)"),
            limit: format!("≥ {:.1}×", budget::GOODPUT_RATIO),
            // NaN (no round, or no 200 at 64 connections) fails.
            pass: Some(goodput >= budget::GOODPUT_RATIO),
        });
        let p99 = self.storm_p99_ms();
        checks.push(Check {
            line: format!(
                "p99 of the 200s under overload, {OVERLOAD_CONNECTIONS} conns, worst round"
            ),
            figure: format!("{p99:.1} ms"),
            limit: format!("< {:.0} ms", budget::OVERLOAD_P99_MS),
            // NaN (no 200 at all) fails.
            pass: Some(p99 < budget::OVERLOAD_P99_MS),
        });
        let peak = self
            .distances
            .iter()
            .map(|(_, p)| p.klaus_peak_mb)
            .chain(self.rounds.iter().map(|r| r.storm.klaus_peak_mb))
            .reduce(f64::max);
        checks.push(Check {
            line: "Klaus peak RSS, 2,000 conns, any distance and under overload".into(),
            figure: peak.map_or("not measured".into(), |mb| format!("{mb:.1} MiB")),
            limit: format!("≤ {:.0} MiB (the manifests' limit)", budget::RSS_LIMIT_MB),
            pass: peak.map(|mb| mb <= budget::RSS_LIMIT_MB),
        });
        checks
    }

    /// The placement table.
    pub(in crate::bench) fn markdown(&self, md: &mut String) {
        md.push_str(
            "\n| placement | conns | 200/s | p50 ms (200s) | p99 ms (200s) | 503 | not 200 | \
             Klaus + Petra CPU µs/req | Klaus on a core | Klaus on or waiting for a core | \
             Klaus peak RSS MiB | other load |\n\
             |---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|\n",
        );
        for (distance, point) in &self.distances {
            point.row(md, &format!("Klaus → link → Petra, {}", distance.label));
        }
        for (i, round) in self.rounds.iter().enumerate() {
            let n = i + 1;
            round
                .base
                .row(md, &format!("Klaus beside Petra, no link, round {n}"));
            round.storm.row(
                md,
                &format!("Klaus beside Petra, no link (overload), round {n}"),
            );
        }
    }

    /// Writes `placement.md`, `placement.json` and `placement.svg` into `out`, and the plot to
    /// `docs/img/placement.svg` too when `to_docs` (not after a smoke run).
    pub(in crate::bench) fn write(&self, out: &Path, to_docs: bool) -> anyhow::Result<()> {
        let checks = self.checks();
        let mut md = String::new();
        self.markdown(&mut md);
        budget_table(&mut md, &checks);
        fs::write(out.join("placement.md"), md.trim_start())
            .context("writing target/bench/placement.md")?;
        let mut json = self.json();
        json["budget"] = checks.iter().map(Check::json).collect();
        fs::write(
            out.join("placement.json"),
            serde_json::to_string_pretty(&json)?,
        )
        .context("writing target/bench/placement.json")?;
        let samples: Vec<plot::Sample> = self
            .distances
            .iter()
            .map(|(d, p)| plot::Sample {
                rtt_ms: d.rtt_ms as f64,
                ok_rps: p.ok_rps,
                p50_ms: p.ok_p50_ms,
                p99_ms: p.ok_p99_ms,
            })
            .collect();
        let svg = plot::svg(&samples)?;
        fs::write(out.join("placement.svg"), &svg).context("writing target/bench/placement.svg")?;
        println!("written: target/bench/placement.md, placement.json, placement.svg");
        if to_docs {
            let docs = root().join("docs/img");
            fs::create_dir_all(&docs).context("creating docs/img")?;
            fs::write(docs.join("placement.svg"), &svg)
                .context("writing docs/img/placement.svg")?;
            println!("written: docs/img/placement.svg");
        }
        Ok(())
    }

    pub(in crate::bench) fn json(&self) -> Value {
        json!({
            "distances": self.distances.iter().map(|(d, p)| json!({
                "distance": d.label,
                "rtt_ms": d.rtt_ms,
                "jitter_ms": d.jitter_ms,
                "measured": p.json(),
            })).collect::<Vec<_>>(),
            "overload": {
                "rounds": self.rounds.iter().map(|r| json!({
                    "base": r.base.json(),
                    "storm": r.storm.json(),
                    "goodput_ratio": r.goodput(),
                })).collect::<Vec<_>>(),
                "goodput_ratio_median": self.goodput(),
            },
            "saturated_at_percent": budget::SATURATED * 100.0,
        })
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::super::{DISTANCES, case};
    use super::*;
    use crate::bench::measure::Measured;

    /// A point with the figures the budget reads; the rest is filler.
    fn point(ok_rps: f64, ok_p99_ms: f64, status_503: u64, klaus_cpu_pct: f64) -> Point {
        Point {
            measured: Measured {
                case: case("test", LINK_CONNECTIONS),
                responses: 0,
                seconds: 10.0,
                rps: ok_rps,
                p50_ms: 1.0,
                p99_ms: 1.0,
                p999_ms: 1.0,
                errors: 0,
                non_2xx: status_503,
                error_kinds: BTreeMap::new(),
                cpu_us_per_request: 50.0,
                cpu_seconds: BTreeMap::new(),
                peak_rss_mb: BTreeMap::new(),
                background_pct: 0.0,
            },
            ok_rps,
            ok_p50_ms: ok_p99_ms / 2.0,
            ok_p99_ms,
            status_503,
            not_ok: status_503,
            other_statuses: BTreeMap::from([("503".to_owned(), status_503)]),
            klaus_cpu_pct,
            klaus_demand_pct: klaus_cpu_pct,
            machine_busy_pct: 60.0,
            klaus_peak_mb: 40.0,
        }
    }

    /// Co-located, 50 ms and 150 ms, then the overload's 64 and 2,000 connections, the same
    /// in each of three rounds.
    fn placement(points: [Point; 5]) -> Placement {
        let [near, far, farther, base, storm] = points;
        Placement {
            distances: DISTANCES.into_iter().zip([near, far, farther]).collect(),
            rounds: vec![Round { base, storm }; 3],
        }
    }

    fn verdicts(placement: &Placement) -> Vec<Option<bool>> {
        placement.checks().iter().map(|c| c.pass).collect()
    }

    fn good() -> [Point; 5] {
        [
            point(10_000.0, 200.0, 0, 80.0),
            point(8_000.0, 300.0, 0, 70.0),
            point(4_000.0, 600.0, 0, 40.0),
            point(15_000.0, 10.0, 0, 95.0),
            point(12_000.0, 400.0, 5_000, 95.0),
        ]
    }

    #[test]
    fn a_run_within_every_line_passes_them_all() {
        assert_eq!(verdicts(&placement(good())), vec![Some(true); 5]);
    }

    #[test]
    fn the_distance_line_compares_the_200s_with_co_located() {
        let mut points = good();
        points[1] = point(6_999.0, 300.0, 0, 70.0);
        assert_eq!(verdicts(&placement(points))[0], Some(false));
    }

    #[test]
    fn a_503_over_50_ms_misses_unless_the_cpu_is_saturated() {
        let mut points = good();
        points[1] = point(8_000.0, 300.0, 1, 70.0);
        assert_eq!(verdicts(&placement(points.clone()))[1], Some(false));
        points[1] = point(8_000.0, 300.0, 1, 90.0);
        assert_eq!(verdicts(&placement(points.clone()))[1], Some(true));
        // Klaus wanted the core the load generator held: saturated too.
        points[1] = point(8_000.0, 300.0, 1, 50.0);
        points[1].klaus_demand_pct = 95.0;
        assert_eq!(verdicts(&placement(points))[1], Some(true));
    }

    #[test]
    fn overload_needs_goodput_and_a_p99_of_the_200s_under_a_second() {
        let mut points = good();
        points[4] = point(10_000.0, 400.0, 5_000, 95.0);
        assert_eq!(
            verdicts(&placement(points.clone()))[2..4],
            [Some(false), Some(true)]
        );
        points[4] = point(12_000.0, 1_000.0, 0, 95.0);
        assert_eq!(
            verdicts(&placement(points.clone()))[2..4],
            [Some(true), Some(false)]
        );
        // Not a single 200: no percentile, and a miss.
        points[4] = point(0.0, f64::NAN, 60_000, 95.0);
        assert_eq!(
            verdicts(&placement(points))[2..4],
            [Some(false), Some(false)]
        );
    }

    #[test]
    fn goodput_is_the_median_of_the_rounds_and_the_p99_the_worst_round() {
        let mut run = placement(good());
        // One round of three below the line (0.5×): the median (0.8×) passes.
        run.rounds[1].storm = point(7_500.0, 400.0, 0, 95.0);
        assert_eq!(verdicts(&run)[2..4], [Some(true), Some(true)]);
        // Two of three below it: the median misses.
        run.rounds[2].base = point(20_000.0, 10.0, 0, 95.0);
        assert_eq!(verdicts(&run)[2], Some(false));
        // One storm's p99 over a second misses, whatever the others.
        let mut run = placement(good());
        run.rounds[0].storm.ok_p99_ms = 1_200.0;
        assert_eq!(verdicts(&run)[2..4], [Some(true), Some(false)]);
        // A round without one 200 at 64 connections has no ratio: a miss, not an outlier.
        let mut run = placement(good());
        run.rounds[0].base = point(0.0, f64::NAN, 0, 95.0);
        assert_eq!(verdicts(&run)[2], Some(false));
        // No round at all: nothing to pass on.
        run.rounds.clear();
        assert_eq!(verdicts(&run)[2..4], [Some(false), Some(false)]);
    }

    #[test]
    fn memory_is_held_to_the_manifests_limit_at_every_distance() {
        let mut points = good();
        points[2].klaus_peak_mb = 128.5;
        assert_eq!(verdicts(&placement(points))[4], Some(false));
    }
}
