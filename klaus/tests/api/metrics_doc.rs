//! docs/METRICS.md is generated from what the binaries export: Petra and Klaus are started (with
//! a trace exporter, so that every family is registered), called once, and their `/metrics` read;
//! the table of every metric family with its type, labels, help and services must equal the
//! committed file. When it does not, the file is written again and the test fails, so that the
//! change is reviewed and committed with the code that made it.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use serving::testing::TestPki;

use crate::traces::{path, start_pair};

const DOC: &str = "docs/METRICS.md";

/// One metric family as the table shows it.
#[derive(Debug, Default)]
struct Family {
    kind: String,
    help: String,
    labels: std::collections::BTreeSet<String>,
    services: Vec<&'static str>,
}

/// The label names of a sample line's `{...}`, quoted values and escapes skipped.
fn label_names(sample: &str) -> Vec<String> {
    let Some(open) = sample.find('{') else {
        return Vec::new();
    };
    let mut names = Vec::new();
    let mut name = String::new();
    let mut chars = sample[open + 1..].chars();
    let mut in_value = false;
    while let Some(c) = chars.next() {
        match (in_value, c) {
            (false, '}') => break,
            (false, '=') => names.push(std::mem::take(&mut name)),
            (false, ',' | ' ') => {}
            (false, '"') => in_value = true,
            (false, c) => name.push(c),
            (true, '\\') => {
                chars.next();
            }
            (true, '"') => in_value = false,
            (true, _) => {}
        }
    }
    names
}

/// Reads an OpenMetrics text into `families`, for `service`.
fn read(text: &str, service: &'static str, families: &mut BTreeMap<String, Family>) {
    let mut kinds: BTreeMap<String, String> = BTreeMap::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').expect("# TYPE name kind");
            kinds.insert(name.to_owned(), kind.to_owned());
            let family = families.entry(name.to_owned()).or_default();
            family.kind = kind.to_owned();
            if !family.services.contains(&service) {
                family.services.push(service);
            }
        } else if let Some(rest) = line.strip_prefix("# HELP ") {
            let (name, help) = rest.split_once(' ').unwrap_or((rest, ""));
            families.entry(name.to_owned()).or_default().help = help.to_owned();
        } else if !line.starts_with('#') && !line.is_empty() {
            let sample = line.split(['{', ' ']).next().unwrap_or_default();
            // The family a sample belongs to: the longest declared name it starts with
            // (`x_total` of counter `x`, `x_bucket` of histogram `x`).
            let family = kinds
                .keys()
                .filter(|name| sample.starts_with(name.as_str()))
                .max_by_key(|name| name.len())
                .cloned()
                .unwrap_or_else(|| panic!("a sample of no declared family: {line}"));
            let entry = families.entry(family).or_default();
            for label in label_names(line) {
                if label != "le" {
                    entry.labels.insert(label);
                }
            }
        }
    }
}

fn render(families: &BTreeMap<String, Family>) -> String {
    let mut out = String::from(
        "# Metrics\n\n\
         Every metric Petra and Klaus export on the admin port's `/metrics` (OpenMetrics text), \
         generated from the running binaries by `klaus/tests/api/metrics_doc.rs`: the test \
         fails, and writes this file again, when the code exports something the file does not \
         say. Names are as queried (a histogram's series add `_bucket`, `_sum` and `_count`). \
         docs/ARCHITECTURE.md (\"Metrics\") says what \
         they are for, docs/RUNBOOK.md which alert reads which.\n\n\
         | metric | type | labels | services | help |\n|---|---|---|---|---|\n",
    );
    for (name, family) in families {
        let name = match family.kind.as_str() {
            "counter" => format!("{name}_total"),
            "info" => format!("{name}_info"),
            _ => name.clone(),
        };
        let labels = family
            .labels
            .iter()
            .map(|l| format!("`{l}`"))
            .collect::<Vec<_>>()
            .join(", ");
        let _ = writeln!(
            out,
            "| `{name}` | {} | {} | {} | {} |",
            family.kind,
            labels,
            family.services.join(", "),
            family.help.replace('|', "\\|")
        );
    }
    out
}

#[tokio::test]
async fn docs_metrics_md_lists_every_metric_the_binaries_export() {
    let pki = TestPki::new();
    // A collector that does not exist: the export metrics are registered all the same.
    let otel = [("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:9")];
    // Klaus with a TLS front too, so that its server certificate's expiry is exported.
    let front = [
        ("TLS_CERT_FILE", path(&pki.petra.cert)),
        ("TLS_KEY_FILE", path(&pki.petra.key)),
    ];
    let (petra, klaus) = start_pair(&pki, &otel, &front);
    // One call, so that the families whose labels appear with the first sample have one.
    let client = serving::testing::client(&pki.ca_file, None);
    let response = client
        .get(format!("https://localhost:{}/", klaus.main_addr.port()))
        .send()
        .await
        .expect("request");
    assert_eq!(response.status(), 200);

    let mut families = BTreeMap::new();
    read(&petra.metrics().await, "petra", &mut families);
    read(&klaus.metrics().await, "klaus", &mut families);
    assert!(families.len() > 30, "{families:?}");
    let table = render(&families);

    let doc = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .join(DOC);
    let committed = std::fs::read_to_string(&doc).unwrap_or_default();
    if committed != table {
        std::fs::write(&doc, &table).expect("write docs/METRICS.md");
        panic!(
            "{DOC} did not match what the binaries export; it has been written again: review and commit it"
        );
    }
}

#[test]
fn label_names_skip_quoted_values_with_escapes() {
    assert_eq!(
        label_names(r#"x_total{a="1",b="q\"uo,te=}",c="z"} 3"#),
        ["a", "b", "c"]
    );
    assert!(label_names("x_total 3").is_empty());
}
