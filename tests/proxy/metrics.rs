//! The Prometheus endpoint: scraped over HTTP after known traffic.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::support::fixture;

/// GET `path` over plain HTTP; (status line, body).
async fn get(addr: SocketAddr, path: &str) -> (String, String) {
    let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes())
        .await
        .expect("send");
    let mut resp = Vec::new();
    s.read_to_end(&mut resp).await.expect("read");
    let text = String::from_utf8_lossy(&resp).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").expect("http response");
    (
        head.lines().next().unwrap_or("").to_string(),
        body.to_string(),
    )
}

/// The value of the sample `name{labels}` in an exposition.
fn sample(body: &str, name_and_labels: &str) -> Option<f64> {
    body.lines()
        .find(|l| l.starts_with(name_and_labels) && l[name_and_labels.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

async fn proxy_with_metrics() -> (SocketAddr, SocketAddr) {
    let f = fixture();
    let (addr, ctx) = f
        .extra_proxy_ctx(|c| c.admin.metrics_listen = Some("127.0.0.1:0".parse().expect("addr")))
        .await;
    (addr, *ctx.metrics_addr.get().expect("metrics bound"))
}

#[tokio::test]
async fn a_scrape_counts_exactly_the_traffic_sent() {
    let (addr, metrics) = proxy_with_metrics().await;
    // A raw client reads each answer up to its ReadyForQuery before it sends the next query,
    // so what is counted does not depend on how a driver pipelines (tests/proxy/pinning.rs
    // counts pipelined queries).
    let mut c = crate::support::RawClient::login(addr, "app.globex", "globex").await;
    let failed = c.query("SELECT 1/0").await;
    assert!(
        failed.iter().any(|(tag, _)| *tag == b'E'),
        "division by zero"
    );
    for _ in 0..4 {
        let ok = c.query("SELECT 1").await;
        assert!(!ok.iter().any(|(tag, _)| *tag == b'E'), "select");
    }
    let (status, body) = get(metrics, "/metrics").await;
    assert!(status.contains("200"), "{status}");
    let l = r#"{role="app",tenant="globex"}"#;
    assert_eq!(
        sample(&body, &format!("pgtenant_transactions_total{l}")),
        Some(5.0),
        "{}",
        body.lines()
            .filter(|l| l.contains("globex"))
            .collect::<Vec<_>>()
            .join("\n")
    );
    assert_eq!(
        sample(&body, &format!("pgtenant_queries_total{l}")),
        Some(5.0)
    );
    assert_eq!(
        sample(
            &body,
            &format!("pgtenant_transaction_duration_seconds_count{l}")
        ),
        Some(5.0)
    );
    assert_eq!(
        sample(&body, &format!("pgtenant_query_duration_seconds_count{l}")),
        Some(5.0)
    );
    assert_eq!(
        sample(
            &body,
            &format!("pgtenant_pool_wait_duration_seconds_count{l}")
        ),
        Some(5.0)
    );
    assert_eq!(
        sample(
            &body,
            r#"pgtenant_errors_total{class="22",role="app",tenant="globex"}"#
        ),
        Some(1.0)
    );
    assert_eq!(
        sample(
            &body,
            r#"pgtenant_client_connections{role="app",state="idle",tenant="globex"}"#
        ),
        Some(1.0)
    );
    assert!(
        sample(&body, &format!("pgtenant_client_received_bytes_total{l}")).unwrap_or(0.0) > 0.0
    );
    assert!(body.contains("pgtenant_server_up{"), "server health");
    assert!(
        body.contains("process_resident_memory_bytes"),
        "process metrics"
    );
}

#[tokio::test]
async fn other_paths_are_not_found() {
    let (_, metrics) = proxy_with_metrics().await;
    let (status, _) = get(metrics, "/").await;
    assert!(status.contains("404"), "{status}");
}

#[tokio::test]
async fn a_removed_tenants_series_leave_the_scrape() {
    let f = fixture();
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("proxy.toml");
    let mut config = f.config.clone();
    config.listen = "127.0.0.1:0".parse().expect("addr");
    config.admin.metrics_listen = Some("127.0.0.1:0".parse().expect("addr"));
    std::fs::write(&path, config.to_toml()).expect("write config");
    let loaded = pgtenant::config::Config::load(&path).expect("load");
    let (addr, ctx) = f.extra_proxy_ctx(move |c| *c = loaded).await;
    let metrics = *ctx.metrics_addr.get().expect("metrics");
    let c = f.tenant_at(addr, "umbrella").await;
    c.batch_execute("SELECT 1").await.expect("select");
    drop(c);
    let (_, body) = get(metrics, "/metrics").await;
    assert!(body.contains(r#"tenant="umbrella""#));

    config.tenants.retain(|t| t.id != "umbrella");
    std::fs::write(&path, config.to_toml()).expect("rewrite");
    let changed = ctx
        .reload(&pgtenant::config::Config::load(&path).expect("load"))
        .expect("reload");
    assert_eq!(changed, 1);
    let (_, body) = get(metrics, "/metrics").await;
    assert!(
        !body.contains(r#"tenant="umbrella""#),
        "umbrella's series are gone"
    );
}

#[tokio::test]
async fn a_scrape_of_ten_thousand_tenants_stays_fast() {
    use pgtenant::pool::stats::{Metrics, PoolStats};
    let m = Metrics::new();
    let stats: Vec<PoolStats> = (0..10_000)
        .map(|i| {
            let s = PoolStats::new(&m, &format!("tenant{i:05}"), "app");
            s.transaction(0.001, 100, 200);
            s.queries.inc();
            s.wait_seconds.observe(0.0001);
            s.query_seconds.observe(0.001);
            s
        })
        .collect();
    let started = Instant::now();
    let mut out = Vec::new();
    prometheus::Encoder::encode(
        &prometheus::TextEncoder::new(),
        &m.registry.gather(),
        &mut out,
    )
    .expect("encode");
    let took = started.elapsed();
    let text = String::from_utf8(out).expect("utf8");
    assert!(text.contains(r#"tenant="tenant09999""#));
    eprintln!(
        "10,000 tenants: {} series lines, {} bytes, encoded in {took:?}",
        text.lines().filter(|l| !l.starts_with('#')).count(),
        text.len()
    );
    // Generous: a debug build on a loaded 2-core machine. The release figure is in the docs.
    assert!(took < Duration::from_secs(20), "{took:?}");
    drop(stats);
}

#[tokio::test]
async fn session_mode_errors_are_counted_by_class_too() {
    let f = fixture();
    let (addr, ctx) = f
        .extra_proxy_ctx(|c| {
            c.admin.metrics_listen = Some("127.0.0.1:0".parse().expect("addr"));
            for t in c.tenants.iter_mut().filter(|t| t.id == "umbrella") {
                t.pool_mode = Some(pgtenant::config::PoolMode::Session);
            }
        })
        .await;
    let metrics = *ctx.metrics_addr.get().expect("metrics");
    let c = f.tenant_at(addr, "umbrella").await;
    c.batch_execute("SELECT 1/0")
        .await
        .expect_err("division by zero");
    c.batch_execute("SELECT 1").await.expect("select");
    let (_, body) = get(metrics, "/metrics").await;
    assert_eq!(
        sample(
            &body,
            r#"pgtenant_errors_total{class="22",role="app",tenant="umbrella"}"#
        ),
        Some(1.0)
    );
    assert_eq!(
        sample(
            &body,
            r#"pgtenant_transactions_total{role="app",tenant="umbrella"}"#
        ),
        Some(2.0)
    );
}
