//! The long fuzz run: the targets of `tests/fuzz` over fresh random and mutated inputs until
//! the time is up, stopping at the first panic, oversized allocation or hang.
//!
//! `cargo run --release --example fuzz -- --minutes 30` (default 5). Prints cases per target.

#[path = "../tests/fuzz/targets.rs"]
mod targets;

use std::time::{Duration, Instant};

use proptest::strategy::{Strategy, ValueTree};
use proptest::test_runner::{Config, TestRunner};
use targets::*;

#[global_allocator]
static ALLOC: CountingAlloc = CountingAlloc;

/// One input run longer than this is a hang.
const HANG: Duration = Duration::from_secs(10);

fn run<S: Strategy>(
    name: &str,
    runner: &mut TestRunner,
    strategy: S,
    target: impl Fn(&S::Value),
    until: Instant,
) where
    S::Value: std::fmt::Debug,
{
    let mut cases = 0u64;
    while Instant::now() < until {
        let value = strategy.new_tree(runner).expect("a value").current();
        let started = Instant::now();
        let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| target(&value)));
        if outcome.is_err() {
            eprintln!("{name}: panicked on input {value:?}");
            std::process::exit(1);
        }
        if started.elapsed() > HANG {
            eprintln!("{name}: took {:?} on input {value:?}", started.elapsed());
            std::process::exit(1);
        }
        assert_no_huge_allocation();
        cases += 1;
    }
    println!("{name}: {cases} cases, no failure");
}

fn main() {
    let minutes: f64 = std::env::args()
        .skip_while(|a| a != "--minutes")
        .nth(1)
        .and_then(|m| m.parse().ok())
        .unwrap_or(5.0);
    let share = Duration::from_secs_f64(minutes * 60.0 / 8.0);
    let mut runner = TestRunner::new(Config::default());
    let bytes = || proptest::collection::vec(proptest::arbitrary::any::<u8>(), 0..512);
    let until = || Instant::now() + share;
    run(
        "startup body",
        &mut runner,
        proptest::prop_oneof![mutated(startup_body_input()), bytes()],
        |b| startup_body(b),
        until(),
    );
    run(
        "startup stream",
        &mut runner,
        proptest::prop_oneof![mutated(startup_packet_input()), bytes()],
        |b| startup_stream(b),
        until(),
    );
    run(
        "framing",
        &mut runner,
        (
            proptest::prop_oneof![mutated(message_stream_input()), bytes()],
            proptest::collection::vec(proptest::arbitrary::any::<usize>(), 0..8),
            proptest::arbitrary::any::<bool>(),
        ),
        |(b, cuts, want)| framing(b, cuts, *want, 1 << 20),
        until(),
    );
    run(
        "sql inspector",
        &mut runner,
        proptest::prop_oneof![sql_input(), proptest::arbitrary::any::<String>()],
        |s| sql(s),
        until(),
    );
    run(
        "scram",
        &mut runner,
        (
            scram_first_input(),
            scram_final_input(),
            proptest::arbitrary::any::<(bool, bool)>(),
        ),
        |(f, l, (c, p))| scram(f, l, *c, *p),
        until(),
    );
    run(
        "sasl exchange",
        &mut runner,
        (sasl_client_input(), proptest::arbitrary::any::<bool>()),
        |(b, c)| sasl_exchange(b, *c),
        until(),
    );
    run(
        "admin command",
        &mut runner,
        proptest::prop_oneof![admin_input(), proptest::arbitrary::any::<String>()],
        |s| admin_command(s),
        until(),
    );
    run(
        "error fields",
        &mut runner,
        error_body_input(),
        |b| error_fields(b),
        until(),
    );
}
