//! The Grafana dashboard in docker/ queries only metrics a scrape exports. Here, where a
//! standby exists, so the replica series are there too.

use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::support::pair;

/// Metric names in a PromQL expression: `pgtenant_*` and `process_*` identifiers.
fn metric_names(expr: &str) -> Vec<String> {
    let mut names = Vec::new();
    let bytes = expr.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        let starts_name = (expr[i..].starts_with("pgtenant_") || expr[i..].starts_with("process_"))
            && (i == 0 || !(bytes[i - 1].is_ascii_alphanumeric() || bytes[i - 1] == b'_'));
        if starts_name {
            let end = expr[i..]
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .map_or(expr.len(), |n| i + n);
            names.push(expr[i..end].to_string());
            i = end;
        } else {
            i += 1;
        }
    }
    names
}

async fn scrape(addr: std::net::SocketAddr) -> String {
    let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .expect("send");
    let mut resp = Vec::new();
    s.read_to_end(&mut resp).await.expect("read");
    String::from_utf8_lossy(&resp).into_owned()
}

#[test]
fn metric_names_are_found_in_promql() {
    assert_eq!(
        metric_names(
            r#"histogram_quantile(0.99, sum by (le) (rate(pgtenant_x_bucket{a="b"}[5m]))) / process_cpu"#
        ),
        vec!["pgtenant_x_bucket".to_string(), "process_cpu".to_string()]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_metric_the_grafana_dashboard_queries_is_exported() {
    let p = pair(|c| c.admin.metrics_listen = Some("127.0.0.1:0".parse().expect("addr"))).await;
    let metrics = *p.proxy.ctx.metrics_addr.get().expect("metrics bound");
    let app = p.connect("app", "acme").await;
    app.batch_execute("SELECT 1").await.expect("select");
    let _ = app.batch_execute("SELECT 1/0").await;
    let reporting = p.connect("reporting", "acme").await;
    reporting.batch_execute("SELECT 1").await.expect("read");
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/docker/grafana/dashboards/pgtenant.json"
    );
    let dashboard: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).expect("dashboard")).expect("json");
    let mut wanted = std::collections::BTreeSet::new();
    for panel in dashboard["panels"].as_array().expect("panels") {
        for target in panel["targets"].as_array().expect("targets") {
            wanted.extend(metric_names(target["expr"].as_str().expect("expr")));
        }
    }
    assert!(wanted.len() >= 10, "the dashboard queries {wanted:?}");
    // Health and lag series appear with the first health checks (every second here).
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let body = scrape(metrics).await;
        let missing: Vec<&String> = wanted
            .iter()
            .filter(|name| !body.lines().any(|l| l.starts_with(name.as_str())))
            .collect();
        if missing.is_empty() {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "the dashboard queries metrics no scrape has: {missing:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
