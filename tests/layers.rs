//! The import graph follows the layers of docs/architecture.md: a module uses only modules of
//! its own layer or below, so there is no circle between the folders. Read from the sources
//! (`crate::` paths outside comments and test modules).

use std::path::{Path, PathBuf};

/// Tenancy's rules: pure, beneath `config/`, which validates with them.
const TENANCY_RULES: [&str; 4] = ["tier", "crypto", "limits", "row_context"];

/// Layer of a module given as its path under `src/` (`tenancy/tier.rs`, `pool/`).
fn layer(module: &str) -> Option<u32> {
    let (top, rest) = module.split_once('/').unwrap_or((module, ""));
    let file = rest.trim_end_matches(".rs");
    if top == "tenancy" && TENANCY_RULES.contains(&file) {
        return Some(15);
    }
    Some(match top.trim_end_matches(".rs") {
        "protocol" | "secret" | "credentials" | "cluster" | "pg_error" => 10,
        "config" | "tls" | "logging" => 20,
        "tenancy" => 30,
        "backend" => 40,
        "pool" => 50,
        "clients" => 60,
        "context" => 70,
        "frontend" | "admin" => 80,
        "proxy" | "main" | "cli" | "demo" | "lib" => 90,
        _ => return None,
    })
}

fn sources(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).expect("read src") {
        let path = entry.expect("entry").path();
        if path.is_dir() {
            sources(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The `crate::a::b` paths a source uses, test modules and comments left out.
fn crate_paths(text: &str) -> Vec<String> {
    let code = text.split("#[cfg(test)]").next().unwrap_or("");
    let mut paths = Vec::new();
    for line in code.lines() {
        let line = line.split("//").next().unwrap_or("");
        let mut rest = line;
        while let Some(i) = rest.find("crate::") {
            rest = &rest[i + "crate::".len()..];
            let end = rest
                .find(|c: char| !(c.is_alphanumeric() || c == '_' || c == ':'))
                .unwrap_or(rest.len());
            paths.push(rest[..end].to_string());
        }
    }
    paths
}

#[test]
fn no_module_imports_from_a_layer_above_its_own() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    sources(&src, &mut files);
    let mut wrong = Vec::new();
    for file in files {
        let module = file
            .strip_prefix(&src)
            .expect("under src")
            .to_string_lossy()
            .to_string();
        let Some(own) = layer(&module) else {
            continue;
        };
        let text = std::fs::read_to_string(&file).expect("read source");
        for path in crate_paths(&text) {
            let mut parts = path.split("::");
            let top = parts.next().unwrap_or("");
            let target = match parts.next() {
                Some(sub) if top == "tenancy" => format!("tenancy/{sub}.rs"),
                _ => top.to_string(),
            };
            if let Some(theirs) = layer(&target) {
                if theirs > own {
                    wrong.push(format!("{module} uses crate::{path}"));
                }
            }
        }
    }
    wrong.sort();
    wrong.dedup();
    assert!(
        wrong.is_empty(),
        "imports from a higher layer:\n{}",
        wrong.join("\n")
    );
}

#[test]
fn tenancy_rules_use_nothing_of_the_tenant_model() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("src/tenancy");
    for rule in TENANCY_RULES {
        let text = std::fs::read_to_string(dir.join(format!("{rule}.rs"))).expect("read");
        let code = text.split("#[cfg(test)]").next().unwrap_or("");
        for line in code
            .lines()
            .filter(|l| l.trim_start().starts_with("use super::"))
        {
            let used = line.trim_start().trim_start_matches("use super::");
            let module = used.split("::").next().unwrap_or("");
            assert!(
                TENANCY_RULES.contains(&module),
                "tenancy/{rule}.rs uses tenancy's {module}, which is above config/"
            );
        }
    }
}
