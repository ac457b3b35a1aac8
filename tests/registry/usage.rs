//! Usage accounting: proxies flush what their tenants used to hourly rows in the registry,
//! and `pgtenant usage` sums them.

use std::time::Duration;

use crate::support::*;

#[tokio::test]
async fn usage_from_two_proxies_is_summed_and_never_double_counted() {
    let f = fixture();
    let reg = f.registry("usage").await;
    reg.create("billed", "database");
    let mut config = reg.config.clone();
    if let Some(r) = config.registry.as_mut() {
        r.usage_interval = 1;
    }
    let a = f.proxy(config.clone());
    let b = f.proxy(config);
    for (proxy, n) in [(&a, 3), (&b, 2)] {
        let c = connect(proxy.addr, "billed").await.expect("connect");
        for _ in 0..n {
            c.batch_execute("SELECT 1").await.expect("select");
        }
    }
    // Several flushes go by; each adds only what is new.
    tokio::time::sleep(Duration::from_millis(3500)).await;
    let out = reg.cli(&["usage", "--tenant", "billed", "--csv"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let text = stdout(&out);
    let mut lines = text.lines();
    let header: Vec<&str> = lines.next().expect("header").split(',').collect();
    assert_eq!(header[0], "tenant");
    let tx = header
        .iter()
        .position(|h| *h == "transactions")
        .expect("column");
    let q = header.iter().position(|h| *h == "queries").expect("column");
    let rows: Vec<Vec<&str>> = lines.map(|l| l.split(',').collect()).collect();
    let total = |i: usize| {
        rows.iter()
            .map(|r| r[i].parse::<i64>().expect("int"))
            .sum::<i64>()
    };
    assert_eq!(total(tx), 5, "{text}");
    assert_eq!(total(q), 5, "{text}");
    assert!(rows.iter().all(|r| r[0] == "billed"));
    // Each proxy wrote rows of its own.
    let instances: i64 = reg
        .store()
        .await
        .client
        .query_one(
            "SELECT count(DISTINCT instance) FROM pgtenant.tenant_usage WHERE tenant_id = 'billed'",
            &[],
        )
        .await
        .expect("count")
        .get(0);
    assert_eq!(instances, 2);
}
