//! Micro-benchmarks of the relay's framing: how fast the scanner walks server output and client
//! requests. Run with `cargo bench --bench framing`.

use criterion::{black_box, criterion_group, criterion_main, Criterion, Throughput};
use pgtenant::protocol::Scanner;

fn message(tag: u8, body: &[u8]) -> Vec<u8> {
    let mut v = vec![tag];
    v.extend_from_slice(&((body.len() + 4) as u32).to_be_bytes());
    v.extend_from_slice(body);
    v
}

/// A result set as PostgreSQL sends it: RowDescription, DataRows, CommandComplete, ReadyForQuery.
fn result_set(rows: usize, row_bytes: usize) -> Vec<u8> {
    let mut out = message(b'T', &[0u8; 40]);
    let row = vec![b'x'; row_bytes];
    for _ in 0..rows {
        out.extend(message(b'D', &row));
    }
    out.extend(message(b'C', b"SELECT 1000\0"));
    out.extend(message(b'Z', b"I"));
    out
}

fn scan_server_output(c: &mut Criterion) {
    let mut g = c.benchmark_group("scan_server_output");
    for (rows, row_bytes) in [(1000, 20), (100, 1000)] {
        let buf = result_set(rows, row_bytes);
        g.throughput(Throughput::Bytes(buf.len() as u64));
        g.bench_function(format!("{rows}x{row_bytes}B"), |b| {
            b.iter(|| {
                let mut s = Scanner::new(0x3fff_ffff, 64 * 1024);
                let mut ready = 0;
                let r = s.scan(
                    black_box(&buf),
                    |t| t == b'Z' || t == b'S',
                    |t, _| {
                        ready += (t == b'Z') as u32;
                        true
                    },
                );
                black_box((r.forward, ready))
            })
        });
    }
    g.finish();
}

fn scan_client_requests(c: &mut Criterion) {
    // pgbench -S in extended mode: Parse/Bind/Describe/Execute/Sync per transaction.
    let mut batch = Vec::new();
    for _ in 0..64 {
        batch.extend(message(
            b'P',
            b"\0SELECT abalance FROM pgbench_accounts WHERE aid = $1;\0\0\0",
        ));
        batch.extend(message(b'B', b"\0\0\0\0\0\x01\0\0\0\x0412345\0\0"));
        batch.extend(message(b'D', b"P\0"));
        batch.extend(message(b'E', b"\0\0\0\0\0"));
        batch.extend(message(b'S', b""));
    }
    let mut g = c.benchmark_group("scan_client_requests");
    g.throughput(Throughput::Elements(64 * 5));
    g.bench_function("extended_protocol_64_transactions", |b| {
        b.iter(|| {
            let mut s = Scanner::new(0x3fff_ffff, 0);
            let mut syncs = 0;
            let r = s.scan(
                black_box(&batch),
                |_| false,
                |t, _| {
                    syncs += (t == b'S') as u32;
                    true
                },
            );
            black_box((r.forward, syncs))
        })
    });
    g.finish();
}

criterion_group!(benches, scan_server_output, scan_client_requests);
criterion_main!(benches);
