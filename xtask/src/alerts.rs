//! `cargo xtask alerts`: the Prometheus rules shipped in the `prometheus-operator` component, checked
//! and unit-tested by promtool.
//!
//! The rules live once, in the component's PrometheusRule; its `spec` is a plain rules file, which
//! this task writes to `target/alerts/rules.yml` beside copies of the unit tests in `monitoring/`. Then:
//! `promtool check rules`, a coverage rule of our own (every alert has a test case that fires it and
//! one that keeps it quiet), and `promtool test rules`. promtool comes from Debian's `prometheus`
//! package, unpacked (not installed: no daemon starts) into the tools folder.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use xshell::{Shell, cmd};
use yaml_rust2::{Yaml, YamlEmitter, YamlLoader};

use crate::tools::{existing, which};
use crate::util::{root, shell, step};

/// The rules, as the Prometheus Operator takes them.
pub(crate) const RULES: &str = "k8s/components/prometheus-operator/prometheusrule.yaml";

/// promtool's unit tests of [`RULES`]: evaluated every minute, and the three-day cases every hour.
const TESTS: &[&str] = &[
    "monitoring/alerts.test.yml",
    "monitoring/alerts-3d.test.yml",
];

/// Checks and tests the alerting rules; fails on a broken rule, a failing test or an untested alert.
pub(crate) fn alerts() -> anyhow::Result<()> {
    let sh = shell()?;
    let promtool = step("promtool", || ensure_prometheus(&sh, "promtool"))?;
    let dir = root().join("target").join("alerts");
    sh.create_dir(&dir)?;
    let rules = step("rules from the PrometheusRule", || {
        write_rules(&root().join(RULES), &dir.join("rules.yml"))
    })?;
    step("promtool check rules", || {
        cmd!(sh, "{promtool} check rules {dir}/rules.yml").run()?;
        Ok(())
    })?;
    step("every alert fires in a test and stays quiet in one", || {
        let tests = read_tests()?;
        let untested = untested(&rules, &tests)?;
        if !untested.is_empty() {
            bail!("the tests in monitoring/ lack: {}", untested.join("; "));
        }
        println!("{} alerts, each fired and kept quiet", rules.len());
        Ok(())
    })?;
    step("promtool test rules", || {
        let mut copies = Vec::new();
        for tests in TESTS {
            let copy = dir.join(Path::new(tests).file_name().context("a test file")?);
            sh.copy_file(root().join(tests), &copy)?;
            copies.push(copy);
        }
        cmd!(sh, "{promtool} test rules {copies...}").run()?;
        Ok(())
    })
}

/// `name` (promtool or prometheus) from `PATH`, else from Debian's `prometheus` package unpacked
/// under the tools folder: `apt-get download` and `dpkg-deb -x`, about 20 MB, once.
pub(crate) fn ensure_prometheus(sh: &Shell, name: &str) -> anyhow::Result<PathBuf> {
    let unpacked = crate::tools::dir().join("prometheus");
    let bin = unpacked.join("usr").join("bin").join(name);
    if let Some(found) = which(name).or_else(|| existing(bin.clone())) {
        return Ok(found);
    }
    println!(
        "{name} is missing: unpacking Debian's prometheus package into {}",
        unpacked.display()
    );
    let download = sh.create_temp_dir()?;
    let _dir = sh.push_dir(download.path());
    if cmd!(sh, "apt-get download prometheus").run().is_err() {
        // A fresh machine may not have the package lists yet.
        cmd!(sh, "apt-get update").run()?;
        cmd!(sh, "apt-get download prometheus")
            .run()
            .context("apt-get download prometheus failed")?;
    }
    let deb = sh
        .read_dir(download.path())?
        .into_iter()
        .find(|path| path.extension().is_some_and(|ext| ext == "deb"))
        .context("apt-get download prometheus left no .deb")?;
    sh.create_dir(&unpacked)?;
    cmd!(sh, "dpkg-deb -x {deb} {unpacked}").run()?;
    existing(bin.clone()).with_context(|| format!("{} is not in the package", bin.display()))
}

/// Writes the PrometheusRule's `spec` at `rules` to `out` as a plain rules file and returns the
/// alert names with how many rules carry each.
pub(crate) fn write_rules(rules: &Path, out: &Path) -> anyhow::Result<BTreeMap<String, usize>> {
    let text = std::fs::read_to_string(rules).with_context(|| rules.display().to_string())?;
    let docs = YamlLoader::load_from_str(&text).with_context(|| rules.display().to_string())?;
    let [doc] = docs.as_slice() else {
        bail!("{}: expected one YAML document", rules.display());
    };
    if doc["kind"].as_str() != Some("PrometheusRule") {
        bail!("{}: not a PrometheusRule", rules.display());
    }
    let spec = &doc["spec"];
    let mut alerts = BTreeMap::new();
    for group in spec["groups"]
        .as_vec()
        .context("spec.groups is not a list")?
    {
        for rule in group["rules"].as_vec().context("a group without rules")? {
            if let Some(alert) = rule["alert"].as_str() {
                *alerts.entry(alert.to_owned()).or_default() += 1;
            }
        }
    }
    let mut plain = String::new();
    YamlEmitter::new(&mut plain).dump(spec)?;
    std::fs::write(out, plain).with_context(|| out.display().to_string())?;
    Ok(alerts)
}

/// The unit test files, parsed.
fn read_tests() -> anyhow::Result<Vec<Yaml>> {
    let mut docs = Vec::new();
    for tests in TESTS {
        let text = std::fs::read_to_string(root().join(tests)).context(tests)?;
        let mut parsed = YamlLoader::load_from_str(&text).context(tests)?;
        docs.push(parsed.pop().with_context(|| format!("{tests}: empty"))?);
    }
    Ok(docs)
}

/// What the unit tests in `docs` miss: alerts of `rules` that no case fires, or that no case
/// expects to be quiet.
fn untested(rules: &BTreeMap<String, usize>, docs: &[Yaml]) -> anyhow::Result<Vec<String>> {
    let mut fired = BTreeMap::<&str, bool>::new();
    let mut quiet = BTreeMap::<&str, bool>::new();
    let tests = docs
        .iter()
        .map(|doc| doc["tests"].as_vec().context("no `tests` list"));
    for test in tests
        .collect::<anyhow::Result<Vec<_>>>()?
        .into_iter()
        .flatten()
    {
        for case in test["alert_rule_test"].as_vec().into_iter().flatten() {
            let name = case["alertname"]
                .as_str()
                .context("a case without alertname")?;
            if !rules.contains_key(name) {
                bail!("a case tests `{name}`, which no rule defines");
            }
            let expected = case["exp_alerts"].as_vec().map_or(0, Vec::len);
            if expected == 0 {
                quiet.insert(name, true);
            } else {
                fired.insert(name, true);
            }
        }
    }
    Ok(rules
        .keys()
        .flat_map(|name| {
            let name = name.as_str();
            [
                (!fired.contains_key(name)).then(|| format!("a case that fires {name}")),
                (!quiet.contains_key(name)).then(|| format!("a case that keeps {name} quiet")),
            ]
        })
        .flatten()
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rules(names: &[&str]) -> BTreeMap<String, usize> {
        names.iter().map(|name| ((*name).to_owned(), 1)).collect()
    }

    const CASES: &str = "
tests:
  - alert_rule_test:
      - alertname: A
        exp_alerts: [{exp_labels: {severity: page}}]
      - alertname: A
        exp_alerts: []
      - alertname: B
        exp_alerts: []
";

    #[test]
    fn an_alert_needs_a_case_that_fires_it_and_one_that_keeps_it_quiet() {
        let cases = YamlLoader::load_from_str(CASES).expect("cases");
        assert!(untested(&rules(&["A"]), &cases).is_err(), "B is not a rule");
        assert_eq!(
            untested(&rules(&["A", "B", "C"]), &cases).expect("checked"),
            [
                "a case that fires B",
                "a case that fires C",
                "a case that keeps C quiet"
            ]
        );
    }

    #[test]
    fn the_shipped_alerts_are_all_tested() {
        let dir = tempfile_dir();
        let rules = write_rules(&root().join(RULES), &dir.join("rules.yml")).expect("rules");
        assert!(rules.len() >= 10, "{rules:?}");
        let tests = read_tests().expect("tests");
        assert_eq!(
            untested(&rules, &tests).expect("checked"),
            Vec::<String>::new()
        );
        let plain = std::fs::read_to_string(dir.join("rules.yml")).expect("written");
        assert!(plain.contains("groups:"), "{plain}");
    }

    fn tempfile_dir() -> PathBuf {
        let dir = std::env::temp_dir().join(format!("xtask-alerts-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        dir
    }
}
