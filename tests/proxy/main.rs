//! Integration tests: real PostgreSQL clusters, real clients, pgtenant in between.

mod support;

mod addressing;
mod admin;
mod auth;
mod backend_tls;
mod budget;
mod deallocate;
mod drivers;
mod faults;
mod flood;
mod front_door;
mod isolation;
mod limits;
mod listen;
mod metrics;
mod peers;
mod pgbench;
mod pinning;
#[path = "../common/pki.rs"]
mod pki;
mod protocol;
mod session;
mod stress;
mod tiers;
mod tls;
mod transaction;
mod transparent;
mod unix_socket;
