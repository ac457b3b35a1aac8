//! Budget settings kept in the registry: a server's connection budget, a tenant's weight.

use crate::support::*;

#[tokio::test]
async fn a_registry_server_budget_and_tenant_weight_reach_the_proxy() {
    let f = fixture();
    let reg = f.registry("budget").await;
    let ca = f.ca.display().to_string();
    let out = reg.cli(&[
        "server",
        "add",
        "main",
        "--host",
        &f.host,
        "--port",
        &f.port.to_string(),
        "--sslmode",
        "verify-full",
        "--sslrootcert",
        &ca,
        "--max-connections",
        "30",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    reg.create("budget-a", "database");
    let out = reg.cli(&["tenant", "update", "budget-a", "--weight", "3"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let show = reg.cli(&["tenant", "show", "budget-a"]);
    assert!(
        stdout(&show)
            .lines()
            .any(|l| l.contains("weight") && l.contains('3')),
        "{}",
        stdout(&show)
    );
    let proxy = f.proxy(reg.config.clone());
    let c = connect(proxy.addr, "budget-a").await.expect("connect");
    c.simple_query("SELECT 1").await.expect("a transaction");
    let tenant = proxy.ctx.registry.tenant("budget-a").expect("served");
    assert_eq!(tenant.weight, 3);
    let limits: Vec<Option<usize>> = proxy
        .ctx
        .pools
        .budgets()
        .iter()
        .map(|(_, b)| b.view().limit)
        .collect();
    assert_eq!(limits, [Some(30)]);
}

#[test]
fn a_weight_of_zero_is_refused() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_pgtenant"))
        .args(["tenant", "update", "x", "--weight", "0"])
        .output()
        .expect("run pgtenant");
    assert!(!out.status.success());
    assert!(stderr(&out).contains("--weight"), "{}", stderr(&out));
}
