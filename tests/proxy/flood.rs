//! A live fuzz: a thousand connections send random, truncated, oversized and slow input at
//! the listener (some after logging in) while real clients keep running transactions.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use rand::{Rng, SeedableRng};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::support::*;

const HOSTILE: usize = 1_000;
const CLIENTS: usize = 20;

fn startup(user: &str, db: &str) -> Vec<u8> {
    RawClient::startup_packet(196608, &[("user", user), ("database", db)])
}

/// Reads whatever the proxy answers until it closes or a moment passes; the answers do not
/// matter, only that the proxy neither crashes nor stalls others.
async fn drain(s: &mut tokio::net::TcpStream) {
    let mut sink = [0u8; 4096];
    let _ = tokio::time::timeout(Duration::from_millis(500), async {
        while matches!(s.read(&mut sink).await, Ok(n) if n > 0) {}
    })
    .await;
}

async fn hostile(addr: SocketAddr, seed: u64) {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let kind = rng.gen_range(0..6);
    if kind == 5 {
        // Logs in for real, then sends random messages to a live session.
        let mut c = RawClient::login(addr, "app.crowd", "crowd").await;
        let len = rng.gen_range(1..2048);
        let mut junk: Vec<u8> = (0..len).map(|_| rng.gen()).collect();
        if rng.gen_bool(0.5) {
            // Keep a plausible tag so the junk reaches a message parser.
            junk[0] = *b"QPBEDCSHFdcf".get(rng.gen_range(0..12)).unwrap_or(&b'Q');
        }
        let _ = c.stream.write_all(&junk).await;
        drain(&mut c.stream).await;
        return;
    }
    let Ok(mut s) = tokio::net::TcpStream::connect(addr).await else {
        return;
    };
    let valid = startup("app.crowd", "crowd");
    match kind {
        0 => {
            let len = rng.gen_range(1..4096);
            let junk: Vec<u8> = (0..len).map(|_| rng.gen()).collect();
            let _ = s.write_all(&junk).await;
        }
        1 => {
            let cut = rng.gen_range(1..valid.len());
            let _ = s.write_all(&valid[..cut]).await;
        }
        2 => {
            let mut huge = vec![0x7f, 0xff, 0xff, 0xff, 0, 3, 0, 0];
            huge.extend(std::iter::repeat_n(b'x', 8192));
            let _ = s.write_all(&huge).await;
        }
        3 => {
            // One byte per 100 ms.
            for b in valid.iter().take(30) {
                if s.write_all(&[*b]).await.is_err() {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
        _ => {
            // A startup packet, then garbage where the SASL response belongs.
            let _ = s.write_all(&valid).await;
            let len = rng.gen_range(1..512);
            let mut junk: Vec<u8> = (0..len).map(|_| rng.gen()).collect();
            junk[0] = b'p';
            let _ = s.write_all(&junk).await;
        }
    }
    drain(&mut s).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_hostile_connections_do_not_disturb_twenty_real_clients() {
    let f = fixture();
    let addr = f.extra_proxy(|_| {}).await;
    let mut clients = Vec::new();
    for _ in 0..CLIENTS {
        clients.push(f.tenant_at(addr, "crowd").await);
    }
    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicU64::new(0));
    let mut workers = Vec::new();
    for c in clients {
        let (stop, done) = (stop.clone(), done.clone());
        workers.push(tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                c.batch_execute("BEGIN").await?;
                let n: i32 = c.query_one("SELECT 41 + 1", &[]).await?.get(0);
                assert_eq!(n, 42);
                c.batch_execute("COMMIT").await?;
                done.fetch_add(1, Ordering::Relaxed);
            }
            Ok::<(), tokio_postgres::Error>(())
        }));
    }
    let seed: u64 = rand::random();
    eprintln!("hostile seed {seed}");
    let attackers: Vec<_> = (0..HOSTILE as u64)
        .map(|i| tokio::spawn(hostile(addr, seed.wrapping_add(i))))
        .collect();
    for a in attackers {
        a.await.expect("attacker task");
    }
    stop.store(true, Ordering::Relaxed);
    for w in workers {
        w.await
            .expect("worker task")
            .unwrap_or_else(|e| panic!("a real client got an error: {}", pg_error(&e)));
    }
    assert!(
        done.load(Ordering::Relaxed) > 0,
        "real clients made progress"
    );
    let fresh = f.tenant_at(addr, "crowd").await;
    assert_eq!(
        text(&fresh, "SELECT 'still serving'").await,
        "still serving"
    );
}
