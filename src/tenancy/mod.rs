//! Who the tenants are, how a connection names one, and what each isolation tier means for a
//! backend session.

pub mod crypto;
pub mod dump;
pub mod limits;
pub mod migrate;
pub mod model;
pub mod naming;
pub mod pg_registry;
pub mod provision;
pub mod registry;
pub mod rename;
pub mod resolve;
pub mod role_repair;
pub mod row_context;
pub mod store;
pub mod tier;

pub use model::{BackendCredentials, ClientUser, Server, Tenant};
pub use registry::{LayeredRegistry, StaticRegistry, TenantChange, TenantRegistry};
pub use resolve::{resolve, Addressed, ReadIntent, ResolveError};
