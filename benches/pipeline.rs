//! Micro-benchmarks of the transaction engine's pure pipeline: matching a server's responses
//! to the requests they answer, per transaction as pgbench sends them (simple, extended and
//! prepared), and a large result set streamed through. Run with `cargo bench --bench pipeline`.

use std::sync::Arc;

use bytes::BytesMut;
use criterion::{black_box, criterion_group, criterion_main, Criterion, Throughput};
use pgtenant::frontend::transaction::pipeline::{Effects, Pipeline, Ready, Resp};
use pgtenant::protocol::ErrorReport;

/// The engine's effects cost nothing here: the bench measures the pipeline alone.
#[derive(Default)]
struct Count {
    ready: u32,
}

impl Effects for Count {
    fn parameter_status(&mut self, _: &[u8], _: &[u8]) {}
    fn server_fatal(&mut self, _: ErrorReport) {}
    fn parsed(&mut self, _: &Arc<str>) {}
    fn unprepared(&mut self, _: &Arc<str>) {}
    fn client_error(&mut self, _: Option<&[u8]>) {}
    fn replay_failed(&mut self) {}
    fn binding_failed(&mut self) {}
    fn ready(&mut self, _: Ready) {
        self.ready += 1;
    }
    fn command_done(&mut self, _: &[u8]) {}
    fn row_bound(&mut self, _: &Arc<str>, _: bool) {}
}

fn message(tag: u8, body: &[u8]) -> Vec<u8> {
    let mut v = vec![tag];
    v.extend_from_slice(&((body.len() + 4) as u32).to_be_bytes());
    v.extend_from_slice(body);
    v
}

/// RowDescription of pgbench -S's one column.
fn row_description() -> Vec<u8> {
    message(
        b'T',
        b"\0\x01abalance\0\0\0\0\0\0\x03\0\0\0\x17\0\x04\xff\xff\xff\xff\0\0",
    )
}

/// A row, its tag and ReadyForQuery: the rest of a point select's answer.
fn row_and_ready() -> Vec<u8> {
    [
        message(b'D', b"\0\x01\0\0\0\x040000"),
        message(b'C', b"SELECT 1\0"),
        message(b'Z', b"I"),
    ]
    .concat()
}

fn transactions(c: &mut Criterion) {
    let mut g = c.benchmark_group("pipeline_per_transaction");
    g.throughput(Throughput::Elements(1));
    let simple = [row_description(), row_and_ready()].concat();
    g.bench_function("simple", |b| {
        let mut out = BytesMut::with_capacity(8192);
        b.iter(|| {
            let mut p = Pipeline::default();
            p.expect_client(Resp::Query);
            out.clear();
            let s = p.scan(black_box(&simple), &mut out, &mut Count::default());
            black_box(s.ok())
        })
    });
    let extended = [
        message(b'1', b""),
        message(b'2', b""),
        row_description(),
        row_and_ready(),
    ]
    .concat();
    g.bench_function("extended", |b| {
        let mut out = BytesMut::with_capacity(8192);
        b.iter(|| {
            let mut p = Pipeline::default();
            for r in [
                Resp::Parse(None),
                Resp::Bind,
                Resp::DescribePortal,
                Resp::Execute,
                Resp::Sync,
            ] {
                p.expect_client(r);
            }
            out.clear();
            let s = p.scan(black_box(&extended), &mut out, &mut Count::default());
            black_box(s.ok())
        })
    });
    let prepared = [message(b'2', b""), row_and_ready()].concat();
    g.bench_function("prepared", |b| {
        let mut out = BytesMut::with_capacity(8192);
        b.iter(|| {
            let mut p = Pipeline::default();
            for r in [Resp::Bind, Resp::Execute, Resp::Sync] {
                p.expect_client(r);
            }
            out.clear();
            let s = p.scan(black_box(&prepared), &mut out, &mut Count::default());
            black_box(s.ok())
        })
    });
    g.finish();
}

fn result_set(c: &mut Criterion) {
    let mut buf = message(b'T', &[0u8; 40]);
    for _ in 0..1000 {
        buf.extend(message(b'D', &[b'x'; 100]));
    }
    buf.extend(message(b'C', b"SELECT 1000\0"));
    buf.extend(message(b'Z', b"I"));
    let mut g = c.benchmark_group("pipeline_result_set");
    g.throughput(Throughput::Bytes(buf.len() as u64));
    g.bench_function("1000x100B", |b| {
        let mut out = BytesMut::with_capacity(buf.len());
        b.iter(|| {
            let mut p = Pipeline::default();
            p.expect_client(Resp::Query);
            out.clear();
            let s = p.scan(black_box(&buf), &mut out, &mut Count::default());
            black_box(s.ok())
        })
    });
    g.finish();
}

criterion_group!(benches, transactions, result_set);
criterion_main!(benches);
