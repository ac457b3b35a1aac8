//! Who the tenants are, how a connection names one, and what each isolation tier means for a
//! backend session.

pub mod model;
pub mod registry;
pub mod resolve;
pub mod tier;

pub use model::{BackendCredentials, ClientUser, Server, Tenant};
pub use registry::{StaticRegistry, TenantRegistry};
pub use resolve::{resolve, Addressed, ResolveError};
