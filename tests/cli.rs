//! The `pgtenant` command line, run as a user would.

use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_pgtenant");

#[test]
fn version_prints_the_crate_version() {
    let out = Command::new(BIN).arg("--version").output().unwrap();
    assert!(out.status.success());
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        format!("pgtenant {}", env!("CARGO_PKG_VERSION"))
    );
}

#[test]
fn check_config_accepts_the_example_proxy_toml() {
    let out = Command::new(BIN)
        .args([
            "check-config",
            "--config",
            concat!(env!("CARGO_MANIFEST_DIR"), "/proxy.toml"),
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("ok (2 servers, 3 tenants)"));
}

fn check(text: &str) -> (i32, String) {
    let mut f = tempfile::NamedTempFile::new().unwrap();
    f.write_all(text.as_bytes()).unwrap();
    let out = Command::new(BIN)
        .args(["check-config", "--config"])
        .arg(f.path())
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn check_config_names_the_line_of_a_misspelt_field() {
    let (code, err) = check("listen = \"127.0.0.1:6432\"\n[pool]\ndefault_sise = 3\n");
    assert_eq!(code, 2);
    assert!(err.contains("line 3"), "{err}");
    assert!(err.contains("unknown field `default_sise`"), "{err}");
}

#[test]
fn check_config_names_the_field_of_a_semantic_error() {
    let (code, err) = check(
        "[[servers]]\nname = \"a\"\nhost = \"127.0.0.1\"\nport = 5432\n\
         [[tenants]]\nid = \"acme\"\ntier = \"schema\"\nserver = \"a\"\ndatabase = \"d\"\n",
    );
    assert_eq!(code, 2);
    assert!(
        err.contains("tenants[0].schema: is required for a schema-tier tenant"),
        "{err}"
    );
}

#[test]
fn check_config_refuses_a_password_in_the_registry_url() {
    let (code, err) = check(
        "[registry]\nurl = \"host=db user=pgtenant password=hunter2 dbname=registry\"\nkey = \"env:K\"\n",
    );
    assert_eq!(code, 2);
    assert!(
        err.contains("registry.url: must not contain a password"),
        "{err}"
    );
    assert!(!err.contains("hunter2"), "{err}");
}

#[test]
fn check_config_refuses_a_key_that_is_not_a_file_or_variable() {
    let (code, err) = check("[registry]\nurl = \"host=db dbname=r\"\nkey = \"hunter2\"\n");
    assert_eq!(code, 2);
    assert!(err.contains("registry.key"), "{err}");
}

#[test]
fn registry_commands_without_a_registry_section_say_so() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("p.toml");
    std::fs::write(&path, "").unwrap();
    let out = Command::new(BIN)
        .args(["tenant", "list", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("no [registry] section"));
}

#[test]
fn gen_key_prints_a_usable_master_key() {
    let out = Command::new(BIN)
        .args(["registry", "gen-key"])
        .output()
        .unwrap();
    assert!(out.status.success());
    let key = String::from_utf8_lossy(&out.stdout);
    assert!(pgtenant::tenancy::crypto::MasterKey::from_text(key.trim()).is_some());
}

#[test]
fn check_config_refuses_a_clear_text_password_where_a_verifier_belongs() {
    let (code, err) = check(
        "[[servers]]\nname = \"a\"\nhost = \"127.0.0.1\"\nport = 5432\n\
         [[tenants]]\nid = \"acme\"\ntier = \"database\"\nserver = \"a\"\ndatabase = \"d\"\n\
         [[tenants.users]]\nname = \"app\"\nscram = \"hunter2\"\nbackend_user = \"x\"\n",
    );
    assert_eq!(code, 2);
    assert!(err.contains("tenants[0].users[0].scram"), "{err}");
    assert!(
        !err.contains("hunter2"),
        "the rejected value is not echoed: {err}"
    );
}

#[test]
fn serve_with_a_missing_config_fails_with_its_path() {
    let out = Command::new(BIN)
        .args(["serve", "--config", "/nonexistent/proxy.toml"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("/nonexistent/proxy.toml"));
}

#[test]
fn hash_password_prints_a_scram_verifier_for_stdin() {
    let mut child = Command::new(BIN)
        .arg("hash-password")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(b"s3cret\n").unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success());
    let verifier = String::from_utf8_lossy(&out.stdout).trim().to_string();
    assert!(verifier.starts_with("SCRAM-SHA-256$4096:"), "{verifier}");
    assert!(pgtenant::credentials::ScramVerifier::parse(&verifier).is_some());
    assert!(!verifier.contains("s3cret"));
}

#[test]
fn demo_serves_every_tier_and_cleans_up_on_sigterm() {
    let psql = pgtenant::cluster::find_bindir()
        .map(|d| d.join("psql"))
        .filter(|p| p.exists())
        .unwrap_or_else(|| "psql".into());
    let mut demo = Command::new(BIN)
        .args(["demo", "--listen", "127.0.0.1:0"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(demo.stdout.take().unwrap()).lines();
    let (mut urls, mut config_path) = (Vec::new(), None);
    let (mut serving, mut admin_line, mut metrics_url) = (None, None, None);
    let deadline = Instant::now() + Duration::from_secs(120);
    for line in lines.by_ref() {
        let line = line.unwrap();
        if let Some(p) = line.strip_prefix("config: ") {
            config_path = Some(std::path::PathBuf::from(p));
        }
        if let Some(a) = line.strip_prefix("pgtenant demo: serving on ") {
            serving = Some(a.trim().to_string());
        }
        if line.starts_with("admin console:") {
            admin_line = Some(line.clone());
        }
        if let Some(m) = line.strip_prefix("metrics:") {
            metrics_url = m.split_whitespace().nth(2).map(str::to_string);
        }
        if let Some(start) = line.find("psql \"") {
            let url = line[start + 6..].trim_end_matches('"').to_string();
            let tier = line.split_whitespace().nth(1).unwrap().to_string();
            urls.push((tier, url));
        }
        if line.starts_with("Press Ctrl-C") || Instant::now() > deadline {
            break;
        }
    }
    assert_eq!(urls.len(), 6, "two tenants per tier: {urls:?}");
    for tier in ["database", "schema", "row"] {
        assert_eq!(urls.iter().filter(|(t, _)| t == tier).count(), 2, "{tier}");
    }
    for (tier, url) in &urls {
        assert!(
            url.ends_with("sslmode=require"),
            "the demo's lines use TLS: {url}"
        );
        let out = Command::new(&psql)
            .args(["-X", "-At", url, "-c", "SELECT count(*) FROM accounts"])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{tier} {url}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(
            String::from_utf8_lossy(&out.stdout).trim(),
            "2",
            "{tier} {url}"
        );
    }
    // The admin console line and the metrics URL it printed work.
    let admin_line = admin_line.expect("the demo printed the admin console line");
    assert!(admin_line.contains("-U admin pgtenant"), "{admin_line}");
    let serving: std::net::SocketAddr = serving.expect("serving line").parse().expect("addr");
    let out = Command::new(&psql)
        .args(["-X", "-At", "-h"])
        .arg(serving.ip().to_string())
        .arg("-p")
        .arg(serving.port().to_string())
        .args(["-U", "admin", "pgtenant", "-c", "SHOW VERSION"])
        .env("PGPASSWORD", "demo")
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&out.stdout).starts_with("pgtenant"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let url = metrics_url.expect("the demo printed the metrics URL");
    let hostport = url
        .strip_prefix("http://")
        .and_then(|u| u.strip_suffix("/metrics"))
        .expect("metrics URL");
    let mut http = std::net::TcpStream::connect(hostport).expect("metrics endpoint");
    std::io::Write::write_all(&mut http, b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    let mut scrape = String::new();
    std::io::Read::read_to_string(&mut http, &mut scrape).unwrap();
    assert!(scrape.starts_with("HTTP/1.1 200"), "{scrape}");
    assert!(scrape.contains("pgtenant_transactions_total"), "{scrape}");

    let config_path = config_path.expect("the demo printed its config path");
    assert!(config_path.exists());
    pgtenant::config::Config::load(&config_path).expect("the printed config is valid");
    // The printed config drives the registry CLI while the demo runs.
    let list = Command::new(BIN)
        .args(["tenant", "list", "--json", "--config"])
        .arg(&config_path)
        .output()
        .unwrap();
    assert!(
        list.status.success(),
        "{}",
        String::from_utf8_lossy(&list.stderr)
    );
    let tenants: serde_json::Value = serde_json::from_slice(&list.stdout).expect("json");
    assert_eq!(tenants.as_array().map(|a| a.len()), Some(6));

    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(demo.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let status = demo.wait().unwrap();
    assert!(status.success(), "{status:?}");
    assert!(!config_path.exists(), "the demo removed its files");
}

#[test]
fn the_config_may_be_named_before_the_subcommand() {
    let out = Command::new(BIN)
        .args([
            "--config",
            concat!(env!("CARGO_MANIFEST_DIR"), "/proxy.toml"),
            "check-config",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn the_config_may_come_from_pgtenant_config() {
    let out = Command::new(BIN)
        .arg("check-config")
        .env(
            "PGTENANT_CONFIG",
            concat!(env!("CARGO_MANIFEST_DIR"), "/proxy.toml"),
        )
        .current_dir(std::env::temp_dir())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn a_config_flag_wins_over_pgtenant_config() {
    let out = Command::new(BIN)
        .args(["check-config", "--config", "/nonexistent/proxy.toml"])
        .env(
            "PGTENANT_CONFIG",
            concat!(env!("CARGO_MANIFEST_DIR"), "/proxy.toml"),
        )
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
}

#[test]
fn check_config_refuses_a_zero_budget_or_weight() {
    let server = "[[servers]]\nname = \"s\"\nhost = \"127.0.0.1\"\nport = 5432\n";
    let (code, err) = check(&format!("{server}max_connections = 0\n"));
    assert_eq!(code, 2);
    assert!(err.contains("servers[0].max_connections"), "{err}");
    let tenant = "[[tenants]]\nid = \"t\"\ntier = \"database\"\nserver = \"s\"\ndatabase = \"t\"\nweight = 0\n";
    let (code, err) = check(&format!("{server}{tenant}"));
    assert_eq!(code, 2);
    assert!(err.contains("tenants[0].weight"), "{err}");
}

#[test]
fn serve_with_one_event_loop_per_core_serves_concurrent_clients() {
    let cluster = pgtenant::cluster::PgCluster::start().expect("a throwaway PostgreSQL");
    let psql = pgtenant::cluster::find_bindir()
        .map(|d| d.join("psql"))
        .filter(|p| p.exists())
        .unwrap_or_else(|| "psql".into());
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port();
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("proxy.toml");
    std::fs::write(
        &config,
        format!(
            "listen = \"127.0.0.1:{port}\"\nworker_threads = 0\n\
             [[servers]]\nname = \"s\"\nhost = \"{}\"\nport = {}\n\
             [[tenants]]\nid = \"t\"\ntier = \"database\"\nserver = \"s\"\ndatabase = \"postgres\"\n\
             [[tenants.users]]\nname = \"app\"\nscram = \"{}\"\nbackend_user = \"postgres\"\n",
            cluster.host(),
            cluster.port(),
            pgtenant::credentials::hash_password("pw")
        ),
    )
    .unwrap();
    let mut proxy = Command::new(BIN)
        .args(["serve", "--config"])
        .arg(&config)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let url = format!("host=127.0.0.1 port={port} user=app.t dbname=t password=pw");
    let deadline = Instant::now() + Duration::from_secs(30);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    let clients: Vec<_> = (0..8)
        .map(|i| {
            let (psql, url) = (psql.clone(), url.clone());
            std::thread::spawn(move || {
                Command::new(psql)
                    .args(["-X", "-At", &url, "-c"])
                    .arg(format!(
                        "SELECT {i} + count(*) FROM generate_series(1, 1000)"
                    ))
                    .output()
                    .unwrap()
            })
        })
        .collect();
    for (i, c) in clients.into_iter().enumerate() {
        let out = c.join().unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(
            String::from_utf8_lossy(&out.stdout).trim(),
            (1000 + i).to_string()
        );
    }
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(proxy.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    assert!(proxy.wait().unwrap().success());
}
