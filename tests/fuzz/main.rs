//! Property tests over random and mutated inputs for every hand-written parser a client or
//! server controls. Bounded for `cargo test` (PGTENANT_FUZZ_CASES, default 10,000 per target);
//! `cargo run --release --example fuzz -- --minutes N` runs the same targets for longer.

mod targets;

use proptest::prelude::*;
use targets::*;

#[global_allocator]
static ALLOC: CountingAlloc = CountingAlloc;

fn config() -> ProptestConfig {
    let cases = std::env::var("PGTENANT_FUZZ_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10_000);
    ProptestConfig {
        cases,
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn startup_bodies_never_panic(b in prop_oneof![mutated(startup_body_input()), prop::collection::vec(any::<u8>(), 0..64)]) {
        startup_body(&b);
        assert_no_huge_allocation();
    }

    #[test]
    fn startup_packets_from_a_socket_never_panic_or_overallocate(b in prop_oneof![mutated(startup_packet_input()), prop::collection::vec(any::<u8>(), 0..64)]) {
        startup_stream(&b);
        assert_no_huge_allocation();
    }

    #[test]
    fn message_framing_stays_inside_its_buffer(
        b in prop_oneof![mutated(message_stream_input()), prop::collection::vec(any::<u8>(), 0..256)],
        cuts in prop::collection::vec(any::<usize>(), 0..8),
        want in any::<bool>(),
        max_body in prop_oneof![Just(1usize << 30), 0usize..128],
    ) {
        framing(&b, &cuts, want, max_body);
        assert_no_huge_allocation();
    }

    #[test]
    fn the_sql_inspector_never_panics(s in prop_oneof![sql_input(), any::<String>()]) {
        sql(&s);
    }

    #[test]
    fn scram_messages_never_panic(
        first in prop_oneof![scram_first_input(), prop::collection::vec(any::<u8>(), 0..64)],
        last in prop_oneof![scram_final_input(), prop::collection::vec(any::<u8>(), 0..64)],
        channel in any::<bool>(),
        plus in any::<bool>(),
    ) {
        scram(&first, &last, channel, plus);
    }

    #[test]
    fn the_sasl_exchange_never_panics_or_hangs(b in sasl_client_input(), channel in any::<bool>()) {
        sasl_exchange(&b, channel);
        assert_no_huge_allocation();
    }

    #[test]
    fn admin_commands_never_panic(s in prop_oneof![admin_input(), any::<String>()]) {
        admin_command(&s);
    }

    #[test]
    fn error_fields_never_panic(b in prop_oneof![error_body_input(), prop::collection::vec(any::<u8>(), 0..64)]) {
        error_fields(&b);
    }
}

#[test]
fn a_startup_length_of_two_gib_allocates_nothing_like_it() {
    startup_stream(&[0x7f, 0xff, 0xff, 0xff, 0, 3, 0, 0]);
    startup_stream(&[0x80, 0, 0, 0, 0, 3, 0, 0]);
    assert_no_huge_allocation();
}

#[test]
fn a_password_message_length_of_two_gib_allocates_nothing_like_it() {
    sasl_exchange(&[b'p', 0x7f, 0xff, 0xff, 0xff, b'S'], false);
    assert_no_huge_allocation();
}

#[test]
fn a_framed_message_length_of_two_gib_streams_without_allocating() {
    framing(
        &[b'Q', 0x7f, 0xff, 0xff, 0xff, b'S', b'E'],
        &[],
        true,
        1 << 31,
    );
    assert_no_huge_allocation();
}
