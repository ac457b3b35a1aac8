//! PostgreSQL v3 wire protocol: framing for the relay's hot path, the startup packet, and the
//! few messages pgtenant writes itself.

pub mod framing;
pub mod messages;
pub mod report;
pub mod sqlstate;
pub mod startup;
pub mod to_server;

pub use framing::{FrameError, Scanned, Scanner, Stop};
pub use report::{ErrorReport, Severity};
