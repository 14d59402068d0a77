//! The placement plot: Klaus's 200s per second and the 200s' latency against the distance to
//! Petra, two panels of one SVG (plotters, SVG backend: no bitmap and no system fonts; the
//! viewer draws the text).

use plotters::prelude::*;

/// Width and height of the picture, in pixels.
const SIZE: (u32, u32) = (960, 400);
const FONT: &str = "sans-serif";
const THROUGHPUT: RGBColor = RGBColor(31, 119, 180);
const P50: RGBColor = RGBColor(44, 160, 44);
const P99: RGBColor = RGBColor(214, 39, 40);
const GUIDE: RGBColor = RGBColor(255, 127, 14);
const FRAME: RGBColor = RGBColor(150, 150, 150);
const GRID: RGBColor = RGBColor(235, 235, 235);

/// One distance as the plot shows it.
#[derive(Debug, Clone, Copy)]
pub(super) struct Sample {
    /// The round trip the link adds, in ms: the x axis.
    pub(super) rtt_ms: f64,
    /// 200 answers per second.
    pub(super) ok_rps: f64,
    /// The 200s' median and 99th percentile latency, in ms.
    pub(super) p50_ms: f64,
    pub(super) p99_ms: f64,
}

/// Draws the samples, nearest first, as an SVG document. The first one is the co-located
/// rate that the 0.7 guide line is drawn from.
pub(super) fn svg(samples: &[Sample]) -> anyhow::Result<String> {
    let mut svg = String::new();
    draw(samples, &mut svg).map_err(|err| anyhow::anyhow!("drawing the placement plot: {err}"))?;
    Ok(svg)
}

fn draw(samples: &[Sample], svg: &mut String) -> Result<(), Box<dyn std::error::Error>> {
    let points: Vec<(f64, f64, f64, f64)> = samples
        .iter()
        .map(|s| (s.rtt_ms, s.ok_rps, s.p50_ms, s.p99_ms))
        .collect();
    let x_max = points.iter().map(|p| p.0).fold(0.0, f64::max) * 1.1 + 10.0;
    let finite = |v: f64| if v.is_finite() { v } else { 0.0 };
    let rps_max = points.iter().map(|p| finite(p.1)).fold(1.0, f64::max) * 1.2;
    let ms_max = points
        .iter()
        .map(|p| finite(p.3).max(finite(p.2)))
        .fold(1.0, f64::max)
        * 1.2;

    let root = SVGBackend::with_string(svg, SIZE).into_drawing_area();
    root.fill(&WHITE)?;
    let (left, right) = root.split_horizontally(SIZE.0 / 2);

    let mut chart = ChartBuilder::on(&left)
        .caption("Klaus: 200 answers per second", (FONT, 18))
        .margin(14)
        .x_label_area_size(40)
        .y_label_area_size(64)
        .build_cartesian_2d(0.0..x_max, 0.0..rps_max)?;
    chart
        .configure_mesh()
        .x_desc("round trip added between Klaus and Petra, ms")
        .y_desc("200s per second")
        .x_label_formatter(&|x| format!("{x:.0}"))
        .y_label_formatter(&|y| format!("{y:.0}"))
        .label_style((FONT, 12))
        .light_line_style(GRID)
        .draw()?;
    if let Some(&(_, near, _, _)) = points.first() {
        // The budget line: 0.7 × the co-located rate.
        let floor = 0.7 * near;
        chart
            .draw_series(DashedLineSeries::new(
                [(0.0, floor), (x_max, floor)],
                6,
                4,
                GUIDE.stroke_width(2),
            ))?
            .label("budget: 0.7 × co-located")
            .legend(|(x, y)| PathElement::new([(x, y), (x + 18, y)], GUIDE.stroke_width(2)));
    }
    chart
        .draw_series(LineSeries::new(
            points.iter().map(|p| (p.0, p.1)),
            THROUGHPUT.stroke_width(2),
        ))?
        .label("200s per second")
        .legend(|(x, y)| PathElement::new([(x, y), (x + 18, y)], THROUGHPUT.stroke_width(2)));
    chart.draw_series(
        points
            .iter()
            .map(|p| Circle::new((p.0, p.1), 4, THROUGHPUT.filled())),
    )?;
    chart.draw_series(points.iter().map(|p| {
        Text::new(
            format!("{:.0}", p.1),
            (p.0 + x_max * 0.015, p.1 + rps_max * 0.03),
            (FONT, 12),
        )
    }))?;
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::LowerLeft)
        .label_font((FONT, 12))
        .background_style(WHITE.mix(0.8))
        .border_style(FRAME)
        .draw()?;

    let mut chart = ChartBuilder::on(&right)
        .caption("Latency of the 200s: p50 and p99", (FONT, 18))
        .margin(14)
        .x_label_area_size(40)
        .y_label_area_size(64)
        .build_cartesian_2d(0.0..x_max, 0.0..ms_max)?;
    chart
        .configure_mesh()
        .x_desc("round trip added between Klaus and Petra, ms")
        .y_desc("ms")
        .x_label_formatter(&|x| format!("{x:.0}"))
        .y_label_formatter(&|y| format!("{y:.0}"))
        .label_style((FONT, 12))
        .light_line_style(GRID)
        .draw()?;
    for (name, color, pick) in [
        (
            "p99",
            P99,
            (|p: &(f64, f64, f64, f64)| p.3) as fn(&_) -> f64,
        ),
        ("p50", P50, |p| p.2),
    ] {
        chart
            .draw_series(LineSeries::new(
                points.iter().map(|p| (p.0, pick(p))),
                color.stroke_width(2),
            ))?
            .label(name)
            .legend(move |(x, y)| PathElement::new([(x, y), (x + 18, y)], color.stroke_width(2)));
        chart.draw_series(
            points
                .iter()
                .map(|p| Circle::new((p.0, pick(p)), 4, color.filled())),
        )?;
        chart.draw_series(points.iter().map(|p| {
            Text::new(
                format!("{:.0}", pick(p)),
                (p.0 + x_max * 0.015, pick(p) + ms_max * 0.03),
                (FONT, 12),
            )
        }))?;
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .label_font((FONT, 12))
        .background_style(WHITE.mix(0.8))
        .border_style(FRAME)
        .draw()?;
    root.present()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(rtt_ms: f64, ok_rps: f64, p50_ms: f64, p99_ms: f64) -> Sample {
        Sample {
            rtt_ms,
            ok_rps,
            p50_ms,
            p99_ms,
        }
    }

    #[test]
    fn draws_both_panels_with_the_figures() -> anyhow::Result<()> {
        let svg = svg(&[
            sample(0.0, 12_345.0, 80.0, 140.0),
            sample(50.0, 9_876.0, 150.0, 260.0),
            sample(150.0, 4_321.0, 420.0, 610.0),
        ])?;
        assert!(svg.starts_with("<svg"), "{}", &svg[..svg.len().min(80)]);
        for text in [
            "Klaus: 200 answers per second",
            "Latency of the 200s",
            "budget: 0.7 × co-located",
            "12345",
            "4321",
            "610",
        ] {
            assert!(svg.contains(text), "no {text:?} in the plot");
        }
        Ok(())
    }

    #[test]
    fn a_case_without_a_single_200_still_draws() -> anyhow::Result<()> {
        let svg = svg(&[
            sample(0.0, 0.0, f64::NAN, f64::NAN),
            sample(50.0, 0.0, f64::NAN, f64::NAN),
        ])?;
        assert!(svg.contains("Latency of the 200s"));
        Ok(())
    }
}
