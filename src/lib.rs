//! pgtenant: a multi-tenant PostgreSQL wire-protocol proxy.
//!
//! The data path, in the order a client meets it:
//! `frontend::listener` accepts a socket → `frontend::startup` reads the startup packet →
//! `tenancy::resolve` names the tenant → `frontend::auth` runs SCRAM against the tenant's
//! verifiers → `pool` hands out a `backend::BackendConn` for (tenant, role) →
//! `frontend::session` relays messages until the client leaves → `backend::cleanup` resets the
//! connection before it goes back to its pool.

pub mod admin;
pub mod backend;
pub mod cli;
pub mod clients;
pub mod cluster;
pub mod config;
pub mod context;
pub mod credentials;
pub mod demo;
pub mod frontend;
pub mod logging;
pub mod pg_error;
pub mod pool;
pub mod protocol;
pub mod proxy;
pub mod secret;
pub mod tenancy;
pub mod tls;
