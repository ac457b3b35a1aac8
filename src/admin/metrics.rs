//! The Prometheus endpoint: `GET /metrics` on `admin.metrics_listen`, in the text exposition
//! format. Counters and histograms are kept by the pools as they go (`pool::stats`); gauges of
//! connection states and server health are brought up to date at each scrape.
//!
//! A minimal HTTP/1.1 responder, hand-written: one route, read-only, one response per
//! connection; an HTTP framework would add a large dependency tree for that.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;

use prometheus::{Encoder, TextEncoder};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::context::ProxyContext;

/// Requests larger than this are not a scrape.
const MAX_REQUEST: usize = 8192;

/// Binds the endpoint; the returned address is the one bound (port 0 picks one).
pub async fn bind(addr: SocketAddr) -> std::io::Result<(TcpListener, SocketAddr)> {
    let l = TcpListener::bind(addr).await?;
    let bound = l.local_addr()?;
    Ok((l, bound))
}

pub async fn serve(listener: TcpListener, ctx: Arc<ProxyContext>) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let ctx = ctx.clone();
        tokio::spawn(async move {
            let _ = respond(stream, &ctx).await;
        });
    }
}

async fn respond(mut stream: TcpStream, ctx: &ProxyContext) -> std::io::Result<()> {
    let mut req = Vec::with_capacity(512);
    let mut buf = [0u8; 1024];
    while !req.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = tokio::time::timeout(std::time::Duration::from_secs(10), stream.read(&mut buf))
            .await
            .map_err(|_| std::io::ErrorKind::TimedOut)??;
        if n == 0 || req.len() + n > MAX_REQUEST {
            return Ok(());
        }
        req.extend_from_slice(&buf[..n]);
    }
    let line = req.split(|&b| b == b'\r').next().unwrap_or_default();
    let mut parts = line.split(|&b| b == b' ');
    let (method, path) = (
        parts.next().unwrap_or_default(),
        parts.next().unwrap_or_default(),
    );
    let (status, body, kind) = if method != b"GET" {
        (
            "405 Method Not Allowed",
            b"GET only\n".to_vec(),
            "text/plain",
        )
    } else if path == b"/metrics" || path.starts_with(b"/metrics?") {
        (
            "200 OK",
            render(ctx),
            "text/plain; version=0.0.4; charset=utf-8",
        )
    } else {
        ("404 Not Found", b"see /metrics\n".to_vec(), "text/plain")
    };
    let head = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {kind}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).await?;
    stream.write_all(&body).await?;
    stream.shutdown().await
}

/// The whole exposition, gauges refreshed first.
pub fn render(ctx: &ProxyContext) -> Vec<u8> {
    refresh_gauges(ctx);
    let mut out = Vec::new();
    let _ = TextEncoder::new().encode(&ctx.pools.metrics().registry.gather(), &mut out);
    out
}

fn refresh_gauges(ctx: &ProxyContext) {
    let m = ctx.pools.metrics();
    // (clients, server connections active, idle) per (tenant, role), replicas included.
    let mut load: HashMap<(String, String), (i64, i64, i64)> = HashMap::new();
    for (key, pool) in ctx.pools.snapshot() {
        let e = load
            .entry((key.tenant.to_string(), key.role.to_string()))
            .or_default();
        let replicas = pool
            .replicas()
            .map(|r| r.pools().to_vec())
            .unwrap_or_default();
        e.0 += pool.load().clients as i64;
        for p in std::iter::once(&pool).chain(replicas.iter()) {
            let l = p.load();
            e.1 += l.connections.saturating_sub(l.idle) as i64;
            e.2 += l.idle as i64;
        }
    }
    for (key, stats) in ctx.pools.all_stats() {
        let (t, r) = (key.tenant.to_string(), key.role.to_string());
        let (clients, active, idle) = load
            .get(&(t.clone(), r.clone()))
            .copied()
            .unwrap_or_default();
        let s = stats.snapshot();
        let busy = (s.active + s.waiting) as i64;
        m.clients
            .with_label_values(&[&t, &r, "idle"])
            .set((clients - busy).max(0));
        m.servers.with_label_values(&[&t, &r, "active"]).set(active);
        m.servers.with_label_values(&[&t, &r, "idle"]).set(idle);
    }
    for (addr, b) in ctx.pools.budgets() {
        let v = b.view();
        let limit = v.limit.map_or(-1, |n| n as i64);
        for (state, n) in [
            ("limit", limit),
            ("used", v.used as i64),
            ("peak", v.peak as i64),
            ("waiting", v.waiting as i64),
        ] {
            m.budget.with_label_values(&[&b.name, &addr, state]).set(n);
        }
    }
    for v in ctx.pools.health().views() {
        m.server_up
            .with_label_values(&[&v.name, &v.addr])
            .set((v.healthy && !v.down) as i64);
        if let Some(lag) = v.lag_ms {
            m.replay_lag
                .with_label_values(&[&v.name, &v.addr])
                .set(lag as f64 / 1000.0);
        }
    }
}
