//! Read-routing settings kept in the registry: replicas, read/write split, fallback, and
//! read-only users.

use crate::support::*;

/// Registers the fixture's own server a second time, as "copy": it stands in for a replica
/// here (routing to a real standby is covered by the replicas suite, and the row context on
/// one by tests/proxy/isolation.rs).
fn add_copy_server(f: &Fixture, reg: &Reg) {
    let out = reg.cli(&[
        "server",
        "add",
        "copy",
        "--host",
        &f.host,
        "--port",
        &f.port.to_string(),
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
}

/// Adds the read-only client user `reporting` to tenant `id`.
fn add_read_only_reporting(reg: &Reg, id: &str) {
    let out = reg.cli_stdin(
        &["tenant", "update", id, "--user", "reporting", "--read-only"],
        PASSWORD,
    );
    assert!(out.status.success(), "{}", stderr(&out));
}

/// Connects through `proxy` as `reporting.<id>`.
async fn connect_reporting(proxy: std::net::SocketAddr, id: &str) -> tokio_postgres::Client {
    let (c, conn) = tokio_postgres::connect(
        &format!(
            "host={} port={} user=reporting.{id} dbname={id} password={PASSWORD}",
            proxy.ip(),
            proxy.port()
        ),
        tokio_postgres::NoTls,
    )
    .await
    .expect("connect");
    tokio::spawn(conn);
    c
}

#[tokio::test]
async fn read_routing_settings_and_read_only_users_round_trip_through_the_registry() {
    let f = fixture();
    let reg = f.registry("routing").await;
    add_copy_server(f, &reg);
    let out = reg.cli_stdin(
        &[
            "tenant",
            "create",
            "readco",
            "--tier",
            "database",
            "--server",
            "main",
            "--password-stdin",
            "--replica",
            "copy",
            "--read-write-split",
            "true",
            "--replica-fallback",
            "false",
            "--slow-transaction-ms",
            "250",
        ],
        PASSWORD,
    );
    assert!(out.status.success(), "{}", stderr(&out));
    add_read_only_reporting(&reg, "readco");

    let shown = reg.cli(&["tenant", "show", "readco", "--json"]);
    let json: serde_json::Value = serde_json::from_str(&stdout(&shown)).expect("json");
    assert_eq!(json["replicas"], serde_json::json!(["copy"]));
    assert_eq!(json["read_write_split"], true);
    assert_eq!(json["replica_fallback"], false);
    assert_eq!(json["slow_transaction_ms"], 250);
    let reporting = json["users"]
        .as_array()
        .and_then(|u| u.iter().find(|u| u["name"] == "reporting"))
        .expect("reporting user");
    assert_eq!(reporting["read_only"], true);

    // The proxy serves the read-only user a read-only session.
    let proxy = f.proxy(reg.config.clone());
    let c = connect_reporting(proxy.addr, "readco").await;
    let e = c
        .batch_execute("INSERT INTO accounts (owner) VALUES ('x')")
        .await
        .expect_err("read-only");
    assert_eq!(sqlstate(&e).as_deref(), Some("25006"), "{e:?}");
}

#[tokio::test]
async fn a_row_tier_tenant_may_read_from_a_replica() {
    let f = fixture();
    let reg = f.registry("rowrepl").await;
    add_copy_server(f, &reg);
    let out = reg.cli_stdin(
        &[
            "tenant",
            "create",
            "rowco",
            "--tier",
            "row",
            "--server",
            "main",
            "--password-stdin",
            "--replica",
            "copy",
        ],
        PASSWORD,
    );
    assert!(out.status.success(), "{}", stderr(&out));
    add_read_only_reporting(&reg, "rowco");
    let shown = reg.cli(&["tenant", "show", "rowco", "--json"]);
    let json: serde_json::Value = serde_json::from_str(&stdout(&shown)).expect("json");
    assert_eq!(json["replicas"], serde_json::json!(["copy"]));

    let proxy = f.proxy(reg.config.clone());
    let c = connect_reporting(proxy.addr, "rowco").await;
    let tenant: String = c
        .query_one("SELECT pgtenant_rls.tenant()", &[])
        .await
        .expect("the replica session is bound to its tenant")
        .get(0);
    assert_eq!(tenant, "rowco");
}
