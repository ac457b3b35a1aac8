//! Read replicas and server faults, against a real streaming replica: each test makes its own
//! primary (initdb) and hot standby (pg_basebackup), provisions sample tenants on the primary,
//! and serves them through a pgtenant of its own, so tests may stop, pause and restart servers
//! without disturbing each other.

mod support;

mod dashboard;
mod failover;
mod faults;
mod routing;
