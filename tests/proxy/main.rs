//! Integration tests: real PostgreSQL clusters, real clients, pgtenant in between.

mod support;

mod addressing;
mod auth;
mod protocol;
mod session;
mod tiers;
