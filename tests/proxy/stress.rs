//! Many clients of several tenants on a small pool: interleaved transactions, prepared
//! statements and SETs, every result checked.

use std::collections::HashMap;

use crate::support::{fixture, pg_error};

const CLIENTS: usize = 200;
const ROUNDS: usize = 5;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_clients_on_a_pool_of_four_never_cross_talk() {
    let f = fixture();
    let addr = f
        .extra_proxy(|c| {
            for t in c.tenants.iter_mut() {
                t.pool_size = Some(4);
            }
        })
        .await;
    // (tenant, database, what identifies its session)
    let tenants = [
        ("crowd", "crowd", ""),
        ("bulk", "schema_tenants", "bulk"),
        ("swarm", "row_tenants", "swarm"),
    ];
    let run_id = format!("stress-{}", std::process::id());
    let mut tasks = Vec::new();
    for i in 0..CLIENTS {
        let (tenant, db, marker) = tenants[i % tenants.len()];
        let run_id = run_id.clone();
        tasks.push(tokio::spawn(async move {
            let f = fixture();
            let c = f
                .connect_str(&f.url_at(addr, tenant))
                .await
                .unwrap_or_else(|e| panic!("client {i}: {}", pg_error(&e)));
            c.batch_execute(&format!("SET application_name = 'client-{i}'"))
                .await
                .unwrap();
            let insert = c
                .prepare("INSERT INTO accounts (owner, balance) VALUES ($1, $2::int) RETURNING id")
                .await
                .unwrap();
            let context = if tenant == "swarm" {
                "pgtenant_rls.tenant()"
            } else {
                "''"
            };
            let check = c
                .prepare(&format!(
                    "SELECT current_database(), current_setting('application_name'), \
                     current_schemas(false)::text, coalesce({context}, '')"
                ))
                .await
                .unwrap();
            for k in 0..ROUNDS {
                c.batch_execute("BEGIN").await.unwrap();
                let owner = format!("{run_id}-{i}-{k}");
                c.query_one(&insert, &[&owner, &(k as i32)])
                    .await
                    .unwrap_or_else(|e| panic!("client {i} round {k}: {}", pg_error(&e)));
                let row = c.query_one(&check, &[]).await.unwrap();
                assert_eq!(row.get::<_, String>(0), db, "client {i}");
                assert_eq!(row.get::<_, String>(1), format!("client-{i}"), "client {i}");
                let schemas: String = row.get(2);
                let setting: String = row.get(3);
                match tenant {
                    "bulk" => assert!(schemas.contains(marker), "{schemas}"),
                    "swarm" => assert_eq!(setting, marker),
                    _ => assert_eq!(setting, ""),
                }
                c.batch_execute("COMMIT").await.unwrap();
            }
        }));
    }
    for t in tasks {
        t.await.expect("client task");
    }
    // Every committed insert is there exactly once, in its own tenant's table.
    let mut per_tenant: HashMap<&str, i64> = HashMap::new();
    for (tenant, db, _) in tenants {
        let direct = f.direct(0, db).await;
        let table = match tenant {
            "bulk" => "bulk.accounts",
            _ => "accounts",
        };
        let row = direct
            .query_one(
                &format!(
                    "SELECT count(*), count(DISTINCT owner), count(*) FILTER (WHERE tenant_id <> $2)
                     FROM {table} WHERE owner LIKE $1 || '-%'"
                ),
                &[&run_id, &tenant],
            )
            .await
            .unwrap();
        let (n, distinct, foreign): (i64, i64, i64) = (row.get(0), row.get(1), row.get(2));
        assert_eq!(n, distinct, "{tenant}: no duplicates");
        assert_eq!(foreign, 0, "{tenant}: every row carries its tenant");
        per_tenant.insert(tenant, n);
    }
    let expected = |t: usize| ((CLIENTS - t).div_ceil(3) * ROUNDS) as i64;
    assert_eq!(per_tenant["crowd"], expected(0));
    assert_eq!(per_tenant["bulk"], expected(1));
    assert_eq!(per_tenant["swarm"], expected(2));
}
