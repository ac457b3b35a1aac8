//! pgbench, a real client with its own protocol habits, through transaction pooling.

use std::process::Command;

use crate::support::{fixture, stderr, stdout, PASSWORD, SCRATCH};

fn pgbench(port: u16, args: &[&str]) -> std::process::Output {
    let f = fixture();
    Command::new(&f.pgbench)
        .args(args)
        .args([
            "-h",
            "127.0.0.1",
            "-p",
            &port.to_string(),
            "-U",
            "app.scratch",
            "scratch",
        ])
        .env("PGPASSWORD", PASSWORD)
        .output()
        .expect("run pgbench")
}

async fn run_mode(mode: &str) {
    let _serial = SCRATCH.lock().await;
    let f = fixture();
    let init = pgbench(f.proxy.port(), &["-i", "-q", "-s", "1"]);
    assert!(init.status.success(), "pgbench -i: {}", stderr(&init));
    let addr = f
        .extra_proxy(|c| {
            for t in c.tenants.iter_mut() {
                t.pool_size = Some(2);
            }
        })
        .await;
    let port = addr.port();
    let m = mode_arg(mode);
    let out = tokio::task::spawn_blocking(move || {
        pgbench(port, &["-n", "-M", m, "-c", "8", "-j", "2", "-t", "50"])
    })
    .await
    .unwrap();
    let text = stdout(&out);
    assert!(out.status.success(), "{mode}: {}\n{text}", stderr(&out));
    assert!(
        text.contains("number of transactions actually processed: 400/400"),
        "{mode}: {text}"
    );
    assert!(!text.contains("number of failed transactions: 1"), "{text}");
}

fn mode_arg(mode: &str) -> &'static str {
    match mode {
        "simple" => "simple",
        "extended" => "extended",
        _ => "prepared",
    }
}

#[tokio::test]
async fn pgbench_simple_protocol_through_a_pool_of_two() {
    run_mode("simple").await;
}

#[tokio::test]
async fn pgbench_extended_protocol_through_a_pool_of_two() {
    run_mode("extended").await;
}

#[tokio::test]
async fn pgbench_prepared_statements_through_a_pool_of_two() {
    run_mode("prepared").await;
}
