//! The primary restarting under load.

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::support::{blocking, pair, pg_error};

const CLIENTS: i32 = 50;

/// What one client saw of its transactions.
#[derive(Default)]
struct Outcomes {
    committed: Vec<(i32, i32)>,
    failed: Vec<(i32, i32)>,
    /// Commits after the restart began.
    committed_late: usize,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_primary_restart_under_load_loses_no_committed_transaction_and_applies_no_failed_one() {
    let mut p = pair(|_| {}).await;
    let stop = Arc::new(AtomicBool::new(false));
    let restarting = Arc::new(AtomicBool::new(false));
    let mut tasks = Vec::new();
    for client in 0..CLIENTS {
        let c = p.connect("app", "acme").await;
        let (stop, restarting) = (stop.clone(), restarting.clone());
        tasks.push(tokio::spawn(async move {
            let mut o = Outcomes::default();
            let mut seq = 0;
            while !stop.load(Ordering::Relaxed) {
                seq += 1;
                let late = restarting.load(Ordering::Relaxed);
                let r = async {
                    c.batch_execute("BEGIN").await?;
                    for leg in 1..=2 {
                        c.execute(
                            "INSERT INTO ledger (client, seq, leg) VALUES ($1, $2, $3)",
                            &[&client, &seq, &leg],
                        )
                        .await?;
                    }
                    c.batch_execute("COMMIT").await
                }
                .await;
                match r {
                    Ok(()) => {
                        o.committed.push((client, seq));
                        o.committed_late += late as usize;
                    }
                    Err(_) => {
                        o.failed.push((client, seq));
                        // Ends the aborted transaction; fails only if nothing was open.
                        let _ = c.batch_execute("ROLLBACK").await;
                    }
                }
            }
            (o, c.is_closed())
        }));
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;
    restarting.store(true, Ordering::Relaxed);
    let down = Instant::now();
    blocking(|| p.primary.restart()).expect("restart primary");
    let back = Instant::now();
    eprintln!("primary down for {:?}", back - down);
    tokio::time::sleep(Duration::from_secs(3)).await;
    stop.store(true, Ordering::Relaxed);

    let mut committed = HashSet::new();
    let mut failed = HashSet::new();
    let mut late = 0;
    for t in tasks {
        let (o, closed) = t.await.expect("client task");
        assert!(!closed, "no client lost its connection");
        committed.extend(o.committed);
        failed.extend(o.failed);
        late += o.committed_late;
    }
    assert!(
        !failed.is_empty(),
        "the restart failed some transactions in flight"
    );
    assert!(late > 0, "transactions committed again after the restart");

    let direct = p.primary.connect("acme").await.expect("direct");
    let rows = direct
        .query(
            "SELECT client, seq, count(*) FROM ledger GROUP BY 1, 2",
            &[],
        )
        .await
        .unwrap_or_else(|e| panic!("{}", pg_error(&e)));
    let mut present = HashSet::new();
    for r in rows {
        let key = (r.get::<_, i32>(0), r.get::<_, i32>(1));
        assert_eq!(
            r.get::<_, i64>(2),
            2,
            "transaction {key:?} was half-applied"
        );
        present.insert(key);
    }
    for key in &committed {
        assert!(present.contains(key), "committed {key:?} is missing");
    }
    for key in &failed {
        assert!(!present.contains(key), "failed {key:?} was applied");
    }
    eprintln!(
        "{} committed ({late} after the restart began), {} failed",
        committed.len(),
        failed.len()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_arriving_while_the_primary_is_down_waits_and_is_served_when_it_is_back() {
    let mut p = pair(|_| {}).await;
    blocking(|| p.primary.shutdown());
    let url = p.url("app", "acme");
    let (addr_url, started) = (url.clone(), Instant::now());
    let waiting = tokio::spawn(async move {
        let (c, conn) = tokio_postgres::connect(&addr_url, tokio_postgres::NoTls).await?;
        tokio::spawn(conn);
        c.query_one("SELECT 1", &[]).await.map(|_| ())
    });
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(
        !waiting.is_finished(),
        "the client waits, it is not refused"
    );
    blocking(|| p.primary.start_again()).expect("start primary");
    let back = Instant::now();
    waiting
        .await
        .expect("join")
        .unwrap_or_else(|e| panic!("{}", pg_error(&e)));
    eprintln!(
        "served {:?} after the primary was back ({:?} in all)",
        back.elapsed(),
        started.elapsed()
    );
}
