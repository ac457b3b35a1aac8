//! The client side: accept, negotiate, authenticate, relay.

pub mod auth;
pub mod buffers;
pub mod client_state;
pub mod error;
pub mod listener;
pub mod prelude;
pub mod relay;
pub mod scram;
pub mod session;
pub mod sql_policy;
pub mod transaction;

pub use error::SessionError;
