//! Fuzz targets and input generators for every hand-written parser a client or server
//! controls. Shared by the bounded property tests (`cargo test --test fuzz`) and the long run
//! (`cargo run --release --example fuzz`).
//!
//! A target must not panic, hang or allocate out of proportion to its input: the allocator of
//! the binary that includes this file records the largest single allocation.

#![allow(dead_code)]

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};

use proptest::prelude::*;

use pgtenant::protocol::framing::Scanner;
use pgtenant::protocol::startup::{parse_startup, read_startup};

/// Records the largest single allocation, so a length field cannot make a parser allocate
/// what the input does not justify.
pub struct CountingAlloc;

pub static LARGEST_ALLOCATION: AtomicUsize = AtomicUsize::new(0);

unsafe impl GlobalAlloc for CountingAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LARGEST_ALLOCATION.fetch_max(layout.size(), Ordering::Relaxed);
        System.alloc(layout)
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        System.dealloc(ptr, layout)
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        LARGEST_ALLOCATION.fetch_max(new_size, Ordering::Relaxed);
        System.realloc(ptr, layout, new_size)
    }
}

/// No input here is over 64 KiB; no parser may take more than this at once for one.
pub const ALLOCATION_LIMIT: usize = 16 << 20;

pub fn assert_no_huge_allocation() {
    let largest = LARGEST_ALLOCATION.load(Ordering::Relaxed);
    assert!(
        largest <= ALLOCATION_LIMIT,
        "a parser allocated {largest} bytes at once"
    );
}

thread_local! {
    static RUNTIME: tokio::runtime::Runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
}

fn block_on<F: std::future::Future>(f: F) -> F::Output {
    RUNTIME.with(|rt| rt.block_on(f))
}

// ---- targets ----

/// The startup packet body parser.
pub fn startup_body(bytes: &[u8]) {
    let _ = parse_startup(bytes);
}

/// The first packet read from a socket: length field, bounds, body.
pub fn startup_stream(bytes: &[u8]) {
    let mut input = bytes;
    block_on(async {
        for _ in 0..4 {
            if read_startup(&mut input).await.is_err() {
                break;
            }
        }
    });
}

/// The relay's framing, fed `bytes` in the chunks `cuts` make, bodies wanted or not. Checks
/// that every scan stays inside its buffer.
pub fn framing(bytes: &[u8], cuts: &[usize], want_bodies: bool, max_body: usize) {
    let mut scanner = Scanner::new(max_body, 8192);
    let mut buf: Vec<u8> = Vec::new();
    let mut fed = 0;
    let mut cuts = cuts
        .iter()
        .map(|c| c % (bytes.len() + 1))
        .collect::<Vec<_>>();
    cuts.sort_unstable();
    cuts.push(bytes.len());
    for cut in cuts {
        if cut < fed {
            continue;
        }
        buf.extend_from_slice(&bytes[fed..cut]);
        fed = cut;
        loop {
            let scanned = scanner.scan(
                &buf,
                |_| want_bodies,
                |_, body| {
                    if let Some(b) = body {
                        assert!(b.len() <= 8192);
                    }
                    true
                },
            );
            assert!(scanned.forward <= buf.len(), "scan ran past its buffer");
            buf.drain(..scanned.forward);
            if scanned.stop.is_some() {
                return;
            }
            if scanned.forward == 0 {
                break;
            }
        }
    }
}

/// The transaction-mode SQL inspector.
pub fn sql(text: &str) {
    use pgtenant::frontend::sql_policy::*;
    for stmt in statements(text) {
        let _ = classify(stmt);
    }
    let _ = may_matter(text);
    let _ = may_change_settings_unseen(text);
    let _ = opens_read_only_transaction(text.as_bytes());
}

/// SCRAM client-first and client-final parsing, with and without a TLS channel.
pub fn scram(first: &[u8], last: &[u8], channel: bool, plus: bool) {
    use pgtenant::frontend::scram::ScramExchange;
    let verifier = verifier();
    let binding = [7u8; 32];
    let channel = channel.then_some(&binding[..]);
    if let Ok(ex) = ScramExchange::start(verifier, first, channel, plus) {
        let _ = ex.finish(last);
    }
}

/// One verifier per thread: hashing a password takes 4,096 rounds.
fn verifier() -> pgtenant::credentials::ScramVerifier {
    use pgtenant::credentials::{hash_password, ScramVerifier};
    thread_local! {
        static VERIFIER: ScramVerifier =
            ScramVerifier::parse(&hash_password("pw")).expect("verifier");
    }
    VERIFIER.with(Clone::clone)
}

/// The whole SASL exchange over a socket, fed whatever the client sends.
pub fn sasl_exchange(client_bytes: &[u8], channel: bool) {
    use pgtenant::frontend::auth::authenticate;
    use tokio::io::AsyncWriteExt;
    block_on(async {
        let (mut client, mut server) = tokio::io::duplex(256 * 1024);
        client.write_all(client_bytes).await.expect("in memory");
        client.shutdown().await.expect("in memory");
        let verifier = verifier();
        let binding = [7u8; 32];
        let r = tokio::time::timeout(
            std::time::Duration::from_secs(5),
            authenticate(
                &mut server,
                "app.acme",
                verifier,
                true,
                channel.then_some(&binding[..]),
            ),
        )
        .await;
        assert!(r.is_ok(), "the exchange hung on finished input");
    });
}

/// The admin console's command parser.
pub fn admin_command(text: &str) {
    let _ = pgtenant::admin::command::parse(text);
}

/// ErrorResponse / NoticeResponse field reading (server-controlled).
pub fn error_fields(bytes: &[u8]) {
    let _ = pgtenant::protocol::report::error_fields(bytes).count();
    let _ = pgtenant::protocol::report::sqlstate_of(bytes);
}

// ---- generators ----

fn be32(n: u32) -> [u8; 4] {
    n.to_be_bytes()
}

/// Lengths that break naive parsers.
const EVIL_LENGTHS: [u32; 8] = [
    0,
    3,
    4,
    0x7fff_ffff,
    0x8000_0000,
    0xffff_ffff,
    1 << 30,
    10_001,
];

/// Random edits of a valid input: flips, cuts, insertions, deletions, evil length fields,
/// repeats.
pub fn mutated(base: impl Strategy<Value = Vec<u8>>) -> impl Strategy<Value = Vec<u8>> {
    (
        base,
        prop::collection::vec((0u8..6, any::<usize>(), any::<u8>()), 0..6),
    )
        .prop_map(|(mut v, edits)| {
            for (op, at, byte) in edits {
                let n = v.len();
                let i = if n == 0 { 0 } else { at % n };
                match op {
                    0 if n > 0 => v[i] ^= byte | 1,
                    1 => v.truncate(i),
                    2 => v.insert(i, byte),
                    3 if n > 0 => {
                        v.remove(i);
                    }
                    4 => {
                        let evil = be32(EVIL_LENGTHS[byte as usize % EVIL_LENGTHS.len()]);
                        for (k, b) in evil.iter().enumerate() {
                            if i + k < v.len() {
                                v[i + k] = *b;
                            }
                        }
                    }
                    _ => {
                        let chunk = v[i..(i + 1 + byte as usize).min(n)].to_vec();
                        v.splice(i..i, chunk);
                    }
                }
            }
            v
        })
}

fn cstring() -> impl Strategy<Value = String> {
    prop_oneof![
        Just(String::new()),
        "[a-z_.]{1,12}",
        "[^\u{0}]{0,24}",
        Just("app.acme".to_string()),
        Just("-c pgtenant.tenant=acme --search_path=x".to_string()),
    ]
}

/// A startup packet body: protocol code, then NUL-terminated pairs.
pub fn startup_body_input() -> impl Strategy<Value = Vec<u8>> {
    let code = prop_oneof![
        Just(196608u32),
        Just(196609),
        Just(80877102),
        Just(80877103),
        Just(80877104),
        any::<u32>(),
    ];
    let names = prop_oneof![
        Just("user".to_string()),
        Just("database".to_string()),
        Just("options".to_string()),
        Just("application_name".to_string()),
        Just("_pq_.x".to_string()),
        Just("replication".to_string()),
        cstring(),
    ];
    (code, prop::collection::vec((names, cstring()), 0..6)).prop_map(|(code, pairs)| {
        let mut v = be32(code).to_vec();
        for (k, val) in pairs {
            v.extend_from_slice(k.as_bytes());
            v.push(0);
            v.extend_from_slice(val.as_bytes());
            v.push(0);
        }
        v.push(0);
        v
    })
}

/// A whole startup packet, with its length in front.
pub fn startup_packet_input() -> impl Strategy<Value = Vec<u8>> {
    startup_body_input().prop_map(|b| {
        let mut v = be32(b.len() as u32 + 4).to_vec();
        v.extend(b);
        v
    })
}

/// One tagged protocol message with a correct length.
fn message() -> impl Strategy<Value = Vec<u8>> {
    let tag = prop_oneof![
        prop::sample::select(b"QPBEDCSHXFdcfpZTRKEN1234snAGWVI".to_vec()),
        any::<u8>(),
    ];
    (tag, prop::collection::vec(any::<u8>(), 0..64)).prop_map(|(tag, body)| {
        let mut v = vec![tag];
        v.extend_from_slice(&be32(body.len() as u32 + 4));
        v.extend(body);
        v
    })
}

/// A stream of messages, as a client or server would send them.
pub fn message_stream_input() -> impl Strategy<Value = Vec<u8>> {
    prop::collection::vec(message(), 0..12).prop_map(|ms| ms.concat())
}

/// SQL built from the pieces the inspector cares about.
pub fn sql_input() -> impl Strategy<Value = String> {
    let piece = prop_oneof![
        prop::sample::select(vec![
            "SET ",
            "SESSION ",
            "LOCAL ",
            "search_path",
            " TO ",
            "=",
            "RESET ",
            "ALL",
            "DISCARD ",
            "DEALLOCATE ",
            "PREPARE ",
            "LISTEN ",
            "BEGIN",
            " READ ONLY",
            "START TRANSACTION",
            "SET TRANSACTION",
            "COMMIT",
            ";",
            "'",
            "''",
            "E'\\'",
            "$$",
            "$x$",
            "\"",
            "--",
            "\n",
            "/*",
            "*/",
            "U&",
            "set_config(",
            "DO ",
            "EXECUTE ",
            "pgtenant.tenant_id",
            " ",
            "é",
            "\u{1F600}",
            "\\",
            "(",
            ")",
            ",",
        ])
        .prop_map(str::to_string),
        "[ -~]{0,8}",
    ];
    prop::collection::vec(piece, 0..24).prop_map(|p| p.concat())
}

/// A SCRAM client-first-message, valid or close to it.
pub fn scram_first_input() -> impl Strategy<Value = Vec<u8>> {
    let header = prop_oneof![
        Just("n,,"),
        Just("y,,"),
        Just("p=tls-server-end-point,,"),
        Just("p=tls-unique,,"),
        Just("n,a=x,"),
        Just("p,,"),
    ];
    mutated(
        (header, "[!-+--~]{0,32}").prop_map(|(h, nonce)| format!("{h}n=,r={nonce}").into_bytes()),
    )
}

/// A SCRAM client-final-message, valid in shape.
pub fn scram_final_input() -> impl Strategy<Value = Vec<u8>> {
    mutated(
        (
            "[A-Za-z0-9+/=]{0,60}",
            "[!-+--~]{0,40}",
            "[A-Za-z0-9+/=]{0,48}",
        )
            .prop_map(|(c, r, p)| format!("c={c},r={r},p={p}").into_bytes()),
    )
}

/// What a client might send during SASL: password messages with plausible bodies.
pub fn sasl_client_input() -> impl Strategy<Value = Vec<u8>> {
    let mechanism = prop_oneof![
        Just("SCRAM-SHA-256"),
        Just("SCRAM-SHA-256-PLUS"),
        Just("PLAIN"),
    ];
    mutated(
        (mechanism, scram_first_input(), scram_final_input()).prop_map(|(mech, first, last)| {
            let mut body = mech.as_bytes().to_vec();
            body.push(0);
            body.extend_from_slice(&be32(first.len() as u32));
            body.extend(first);
            let mut v = vec![b'p'];
            v.extend_from_slice(&be32(body.len() as u32 + 4));
            v.extend(body);
            v.push(b'p');
            v.extend_from_slice(&be32(last.len() as u32 + 4));
            v.extend(last);
            v
        }),
    )
}

/// Admin console commands and near misses.
pub fn admin_input() -> impl Strategy<Value = String> {
    let word = prop_oneof![
        prop::sample::select(vec![
            "SHOW", "POOLS", "PAUSE", "RESUME", "KILL", "RELOAD", "SHUTDOWN", "\"acme\"", ";",
            "\"", " ", "\t", "é",
        ])
        .prop_map(str::to_string),
        "[ -~]{0,6}",
    ];
    prop::collection::vec(word, 0..6).prop_map(|w| w.join(" "))
}

/// ErrorResponse bodies, valid or close to it.
pub fn error_body_input() -> impl Strategy<Value = Vec<u8>> {
    mutated(
        prop::collection::vec(
            (prop::sample::select(b"SVCMDHPWsn".to_vec()), "[ -~]{0,12}"),
            0..6,
        )
        .prop_map(|fields| {
            let mut v = Vec::new();
            for (f, text) in fields {
                v.push(f);
                v.extend_from_slice(text.as_bytes());
                v.push(0);
            }
            v.push(0);
            v
        }),
    )
}
