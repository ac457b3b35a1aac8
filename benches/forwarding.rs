//! The whole per-message forwarding path: a query and its result through pgtenant (transaction
//! and session mode) against the same query sent straight to PostgreSQL, on a throwaway
//! cluster. Run with `cargo bench --bench forwarding` (needs PostgreSQL server binaries).

use criterion::{criterion_group, criterion_main, Criterion};
use pgtenant::cluster::PgCluster;
use pgtenant::config::{Config, PoolMode};
use pgtenant::demo::{self, DEMO_PASSWORD};
use pgtenant::proxy::Proxy;
use tokio_postgres::{Client, NoTls};

async fn connect(url: &str) -> Client {
    let (client, conn) = tokio_postgres::connect(url, NoTls).await.expect("connect");
    tokio::spawn(async move {
        let _ = conn.await;
    });
    client
}

fn forwarding(c: &mut Criterion) {
    let cluster = PgCluster::start().expect("start PostgreSQL");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let tenants: Vec<_> = demo::sample_tenants().into_iter().take(1).collect();
    let config: Config = rt
        .block_on(demo::provision(&[("local", &cluster)], &tenants))
        .expect("provision");
    let mut clients = Vec::new();
    for mode in [PoolMode::Transaction, PoolMode::Session] {
        let mut cfg = config.clone();
        cfg.listen = "127.0.0.1:0".parse().expect("addr");
        cfg.pool.mode = mode;
        let handle = rt.block_on(async { Proxy::bind(cfg).await.expect("bind").spawn() });
        let url = format!(
            "host=127.0.0.1 port={} user=app.acme dbname=acme password={DEMO_PASSWORD}",
            handle.addr.port()
        );
        let client = rt.block_on(connect(&url));
        clients.push((format!("{mode:?}").to_lowercase(), client, handle));
    }
    let direct = rt.block_on(connect(&cluster.conn_string("acme")));

    let mut g = c.benchmark_group("select_1_round_trip");
    g.bench_function("direct", |b| {
        b.to_async(&rt)
            .iter(|| async { direct.simple_query("SELECT 1").await.expect("query") })
    });
    for (name, client, _) in &clients {
        g.bench_function(format!("pgtenant_{name}"), |b| {
            b.to_async(&rt)
                .iter(|| async { client.simple_query("SELECT 1").await.expect("query") })
        });
    }
    g.finish();

    let stmt = rt
        .block_on(clients[0].1.prepare("SELECT $1::int + 1"))
        .expect("prepare");
    c.bench_function("prepared_statement_round_trip/pgtenant_transaction", |b| {
        b.to_async(&rt).iter(|| async {
            clients[0]
                .1
                .query_one(&stmt, &[&1i32])
                .await
                .expect("query")
        })
    });
    drop(clients);
    drop(direct);
    drop(rt);
    drop(cluster);
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(20);
    targets = forwarding
}
criterion_main!(benches);
