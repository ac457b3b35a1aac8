//! Drivers' own behaviour through pgtenant, against the same server directly: psycopg 3's
//! cancel, its Ctrl-C path (interrupted execute → cancel request → close) and a close from
//! another thread while a statement runs, in session and transaction mode. The checks live in
//! `drivers/psycopg_checks.py`; psycopg is installed once into a venv under the build's
//! scratch directory.

use std::path::PathBuf;
use std::process::Command;
use std::sync::Mutex;

use crate::pki::Pki;
use crate::support::*;
use pgtenant::config::{PoolMode, TlsMode};

/// psycopg, pinned: the behaviour checked is this version's.
const PSYCOPG: &str = "psycopg[binary]==3.3.9";

static VENV: Mutex<Option<PathBuf>> = Mutex::new(None);

/// The venv's python, made (and psycopg installed from PyPI) on first use.
fn python() -> PathBuf {
    let mut made = VENV.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(p) = made.as_ref() {
        return p.clone();
    }
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("psycopg-venv");
    let python = dir.join("bin/python");
    let ready = |p: &PathBuf| {
        Command::new(p)
            .args(["-c", "import psycopg"])
            .output()
            .is_ok_and(|o| o.status.success())
    };
    if !ready(&python) {
        let out = Command::new("python3")
            .args(["-m", "venv", "--clear"])
            .arg(&dir)
            .output()
            .expect("python3 is needed for the driver checks");
        assert!(out.status.success(), "python3 -m venv: {out:?}");
        let out = Command::new(dir.join("bin/pip"))
            .args(["install", "--quiet", "--disable-pip-version-check", PSYCOPG])
            .output()
            .expect("pip");
        assert!(
            out.status.success(),
            "installing {PSYCOPG} from PyPI failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    *made = Some(python.clone());
    python
}

/// Runs `check` of psycopg_checks.py against `dsn` and returns what it reported.
async fn psycopg(check: &'static str, dsn: String) -> serde_json::Value {
    let (host, port) = fixture().servers[0].clone();
    let admin = format!("host={host} port={port} user=postgres dbname=postgres");
    let script =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/proxy/drivers/psycopg_checks.py");
    let out = tokio::task::spawn_blocking(move || {
        Command::new(python())
            .arg(script)
            .args([check, &dsn, &admin])
            .output()
            .expect("run psycopg_checks.py")
    })
    .await
    .unwrap();
    assert!(
        out.status.success(),
        "{check}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("one JSON object")
}

/// (name, DSN) of acme directly, through a session-mode proxy and a transaction-mode one, and
/// through both over TLS (libpq 17 and later send the cancel request over TLS too); made once
/// for every check here. The certificates live as long as the `Pki`.
async fn targets() -> &'static (Vec<(&'static str, String)>, Pki) {
    static TARGETS: tokio::sync::OnceCell<(Vec<(&'static str, String)>, Pki)> =
        tokio::sync::OnceCell::const_new();
    TARGETS.get_or_init(make_targets).await
}

async fn make_targets() -> (Vec<(&'static str, String)>, Pki) {
    let f = fixture();
    let (host, port) = f.servers[0].clone();
    let pki = Pki::new();
    let mut tls_proxies = Vec::new();
    for mode in [Some(PoolMode::Session), None] {
        let tls = pki.server_tls(TlsMode::Require);
        let addr = f
            .extra_proxy(move |c| {
                c.tls = tls;
                for t in c.tenants.iter_mut() {
                    t.pool_mode = mode;
                }
            })
            .await;
        tls_proxies.push(format!("{} sslmode=require", f.url_at(addr, "acme")));
    }
    let targets = vec![
        (
            "direct",
            format!("host={host} port={port} user=postgres dbname=acme"),
        ),
        ("session", f.url_at(f.session_proxy().await, "acme")),
        ("transaction", f.url_at(f.proxy, "acme")),
        ("session over TLS", tls_proxies[0].clone()),
        ("transaction over TLS", tls_proxies[1].clone()),
    ];
    (targets, pki)
}

fn seconds(v: &serde_json::Value, field: &str) -> f64 {
    v[field].as_f64().unwrap_or(f64::MAX)
}

/// Each statement sleeps 30 s: an answer within this came from the cancel or the close.
const PROMPT: f64 = 5.0;

#[tokio::test]
async fn psycopg_cancel_stops_the_statement_in_both_modes_as_directly() {
    for (name, dsn) in targets().await.0.iter().cloned() {
        let v = psycopg("cancel", dsn).await;
        assert_eq!(v["outcome"], "QueryCanceled", "{name}: {v}");
        assert!(seconds(&v, "seconds") < PROMPT, "{name}: {v}");
        assert_eq!(v["usable_after"], true, "{name}: {v}");
    }
}

#[tokio::test]
async fn psycopg_ctrl_c_cancels_and_closes_in_both_modes_as_directly() {
    for (name, dsn) in targets().await.0.iter().cloned() {
        let v = psycopg("ctrl_c", dsn).await;
        assert_eq!(v["outcome"], "KeyboardInterrupt", "{name}: {v}");
        assert!(seconds(&v, "seconds") < PROMPT, "{name}: {v}");
        assert!(seconds(&v, "close_seconds") < PROMPT, "{name}: {v}");
        assert!(
            v["server_done_after"].is_number(),
            "{name}: the statement still runs on the server: {v}"
        );
    }
}

#[tokio::test]
async fn psycopg_closing_from_another_thread_ends_the_statement_through_pgtenant() {
    // Directly, the server notices a closed client only when it next writes to it, so a
    // sleeping statement runs on; pgtenant ends it at once (a cancel, then the reset).
    for (name, dsn) in targets().await.0.iter().cloned() {
        let v = psycopg("close_from_another_thread", dsn).await;
        assert_eq!(v["outcome"], "OperationalError", "{name}: {v}");
        assert!(seconds(&v, "seconds") < PROMPT, "{name}: {v}");
        assert!(seconds(&v, "close_seconds") < PROMPT, "{name}: {v}");
        if name != "direct" {
            assert!(
                v["server_done_after"].is_number(),
                "{name}: the statement still runs on the server: {v}"
            );
        }
    }
}

#[tokio::test]
async fn psycopg_listen_hears_notify_in_both_modes_as_directly() {
    for (name, dsn) in targets().await.0.iter().cloned() {
        let v = psycopg("listen", dsn).await;
        assert_eq!(v["payloads"], serde_json::json!(["hello"]), "{name}: {v}");
        assert_eq!(v["usable_after"], true, "{name}: {v}");
    }
}
