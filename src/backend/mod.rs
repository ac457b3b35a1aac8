//! Connections from pgtenant to PostgreSQL servers: open and authenticate one, run the proxy's
//! own statements on it, and reset it before reuse.

pub mod census;
pub mod connection;
pub mod health;
pub mod reset;
pub mod stream;

pub use connection::{BackendConn, BackendError, ConnectSpec, RestoreRolePassword, RoleRepair};
pub use health::{HealthBook, HealthView, ServerHealth};
