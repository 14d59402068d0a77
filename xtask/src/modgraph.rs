//! The invariant docs/ARCHITECTURE.md states: no crate's modules import each other in a circle.
//! A test reads every crate's sources, takes the `crate::`, `super::` and `self::` paths each
//! module names (outside comments and test code) and fails on a circle between sibling modules,
//! naming the files that close it. A path is a text match, not a resolved name: enough for code
//! that imports by path, as this workspace does.

#[cfg(test)]
mod tests {
    use std::collections::{BTreeMap, BTreeSet};
    use std::fs;
    use std::path::{Path, PathBuf};

    use crate::util::root;

    /// The crates whose module graphs must be free of circles.
    const CRATES: [&str; 6] = [
        "serving",
        "petra",
        "klaus",
        "slowlink",
        "tracesink",
        "xtask",
    ];

    /// A module's path inside its crate, e.g. `["upstream", "balance"]`.
    type ModPath = Vec<String>;

    #[test]
    fn no_crate_has_a_circle_of_module_imports() {
        let mut circles = Vec::new();
        for krate in CRATES {
            let src = root().join(krate).join("src");
            let mut edges: BTreeMap<ModPath, BTreeMap<ModPath, PathBuf>> = BTreeMap::new();
            for (file, module) in modules(&src) {
                let text = fs::read_to_string(&file).expect("a readable source file");
                for target in named_paths(&code_of(&text), &module) {
                    for (from, to) in sibling_pairs(&module, &target) {
                        edges.entry(from).or_default().insert(to, file.clone());
                    }
                }
            }
            if let Some(circle) = find_circle(&edges) {
                circles.push(format!("{krate}: {circle}"));
            }
        }
        assert!(
            circles.is_empty(),
            "module imports in a circle:\n{}",
            circles.join("\n")
        );
    }

    #[test]
    fn a_circle_is_found_and_named() {
        let mut edges: BTreeMap<ModPath, BTreeMap<ModPath, PathBuf>> = BTreeMap::new();
        let path = |name: &str| vec![name.to_owned()];
        edges
            .entry(path("a"))
            .or_default()
            .insert(path("b"), "a.rs".into());
        assert_eq!(find_circle(&edges), None);
        edges
            .entry(path("b"))
            .or_default()
            .insert(path("a"), "b.rs".into());
        let circle = find_circle(&edges).expect("a circle");
        assert!(circle.contains("a -> b (a.rs)"), "{circle}");
    }

    #[test]
    fn paths_are_read_from_uses_groups_and_calls_but_not_comments() {
        let module = vec!["upstream".to_owned(), "balance".to_owned()];
        let code = code_of(
            "//! see [`super::error`]\nuse super::{config::Target, discover};\n\
             let x = crate::metrics::f(); // super::tls\n#[cfg(test)]\nmod tests { use super::endpoint; }",
        );
        let named: BTreeSet<ModPath> = named_paths(&code, &module).into_iter().collect();
        let expect = |parts: &[&str]| parts.iter().map(|p| (*p).to_owned()).collect::<ModPath>();
        assert!(named.contains(&expect(&["upstream", "config", "Target"])));
        assert!(named.contains(&expect(&["upstream", "discover"])));
        assert!(named.contains(&expect(&["metrics", "f"])));
        assert!(!named.iter().any(|p| p.contains(&"error".to_owned())));
        assert!(!named.iter().any(|p| p.contains(&"tls".to_owned())));
        assert!(!named.iter().any(|p| p.contains(&"endpoint".to_owned())));
    }

    /// Every source file under `src` with its module path (`lib.rs`, `main.rs` are the root;
    /// `mod.rs` is its folder's module). Test files (`tests.rs`, `tests/`) are left out.
    fn modules(src: &Path) -> Vec<(PathBuf, ModPath)> {
        let mut found = Vec::new();
        let mut dirs = vec![src.to_path_buf()];
        while let Some(dir) = dirs.pop() {
            for entry in fs::read_dir(&dir).expect("a readable source folder") {
                let path = entry.expect("a folder entry").path();
                if path.is_dir() {
                    dirs.push(path);
                    continue;
                }
                if path.extension().is_none_or(|ext| ext != "rs") {
                    continue;
                }
                let relative = path.strip_prefix(src).expect("under src");
                let mut module: ModPath = relative
                    .with_extension("")
                    .components()
                    .map(|c| c.as_os_str().to_string_lossy().into_owned())
                    .collect();
                if module.iter().any(|part| part == "tests") {
                    continue;
                }
                if matches!(
                    module.last().map(String::as_str),
                    Some("mod" | "lib" | "main")
                ) {
                    module.pop();
                }
                found.push((path, module));
            }
        }
        found
    }

    /// The code of a file without its comments and its test module (`#[cfg(test)] mod tests`
    /// onwards: the test module comes last in this workspace's files).
    fn code_of(text: &str) -> String {
        let end = text
            .match_indices("#[cfg(test)]")
            .map(|(at, marker)| at + marker.len())
            .find(|&after| text[after..].trim_start().starts_with("mod tests"))
            .map_or(text.len(), |after| after - "#[cfg(test)]".len());
        text[..end]
            .lines()
            .map(|line| line.split("//").next().unwrap_or_default())
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// The module paths `code` names through `crate::`, `super::` or `self::`, as paths from
    /// the crate root; `use a::{b, c::d}` gives both.
    fn named_paths(code: &str, module: &[String]) -> Vec<ModPath> {
        let mut paths = Vec::new();
        for (anchor, base) in [
            ("crate::", Vec::new()),
            ("super::", module[..module.len().saturating_sub(1)].to_vec()),
            ("self::", module.to_vec()),
        ] {
            let mut rest = code;
            while let Some(at) = rest.find(anchor) {
                let before = rest[..at].chars().next_back();
                let after = &rest[at + anchor.len()..];
                rest = after;
                if before.is_some_and(|c| c.is_alphanumeric() || c == '_' || c == ':') {
                    continue;
                }
                for tail in expand(after) {
                    let mut path = base.clone();
                    path.extend(tail);
                    paths.push(path);
                }
            }
        }
        paths
    }

    /// The paths that start `text`: `a::b` gives one, `{a::b, c}` one per member (one level).
    fn expand(text: &str) -> Vec<ModPath> {
        let is_path = |c: char| c.is_alphanumeric() || c == '_' || c == ':';
        if let Some(group) = text.strip_prefix('{') {
            let inner = group.split('}').next().unwrap_or_default();
            return inner
                .split(',')
                .map(|member| {
                    let member = member.trim();
                    let end = member.find(|c| !is_path(c)).unwrap_or(member.len());
                    split(&member[..end])
                })
                .filter(|path| !path.is_empty())
                .collect();
        }
        let end = text.find(|c| !is_path(c)).unwrap_or(text.len());
        vec![split(&text[..end])]
    }

    fn split(path: &str) -> ModPath {
        path.split("::")
            .filter(|part| !part.is_empty() && *part != "self")
            .map(str::to_owned)
            .collect()
    }

    /// The edges between siblings that `from` naming `to` makes, at every depth where the two
    /// share a parent: `a::x` naming `b::y` is an edge a → b.
    fn sibling_pairs(from: &[String], to: &[String]) -> Vec<(ModPath, ModPath)> {
        let mut pairs = Vec::new();
        for depth in 1..=from.len().min(to.len()) {
            let (a, b) = (&from[..depth], &to[..depth]);
            if a[..depth - 1] == b[..depth - 1] && a != b {
                pairs.push((a.to_vec(), b.to_vec()));
            }
        }
        pairs
    }

    /// A circle in the graph, as `a -> b (file) -> ... -> a`, if there is one.
    fn find_circle(edges: &BTreeMap<ModPath, BTreeMap<ModPath, PathBuf>>) -> Option<String> {
        fn visit(
            node: &ModPath,
            edges: &BTreeMap<ModPath, BTreeMap<ModPath, PathBuf>>,
            stack: &mut Vec<ModPath>,
            done: &mut BTreeSet<ModPath>,
        ) -> Option<Vec<ModPath>> {
            if let Some(start) = stack.iter().position(|n| n == node) {
                let mut circle = stack[start..].to_vec();
                circle.push(node.clone());
                return Some(circle);
            }
            if done.contains(node) {
                return None;
            }
            stack.push(node.clone());
            for next in edges.get(node).into_iter().flat_map(BTreeMap::keys) {
                if let Some(circle) = visit(next, edges, stack, done) {
                    return Some(circle);
                }
            }
            stack.pop();
            done.insert(node.clone());
            None
        }
        let mut done = BTreeSet::new();
        for node in edges.keys() {
            if let Some(circle) = visit(node, edges, &mut Vec::new(), &mut done) {
                let name = |path: &ModPath| path.join("::");
                let steps: Vec<String> = circle
                    .windows(2)
                    .map(|pair| {
                        let file = edges[&pair[0]][&pair[1]].display();
                        format!("{} -> {} ({file})", name(&pair[0]), name(&pair[1]))
                    })
                    .collect();
                return Some(steps.join(", "));
            }
        }
        None
    }
}
