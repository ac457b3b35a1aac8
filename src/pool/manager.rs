//! Opens a pool's backend connections and enters them in the census.

use std::sync::Arc;

use crate::backend::census::{Census, ConnInfo};
use crate::backend::{BackendConn, BackendError, ConnectSpec};

pub struct BackendManager {
    spec: ConnectSpec,
    census: Arc<Census>,
    /// Whose connections these are, for the census (a row group's: its first tenant's).
    tenant: Arc<str>,
    role: Arc<str>,
}

impl std::fmt::Debug for BackendManager {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BackendManager")
            .field("spec", &self.spec)
            .finish_non_exhaustive()
    }
}

impl BackendManager {
    pub fn new(spec: ConnectSpec, census: Arc<Census>, tenant: Arc<str>, role: Arc<str>) -> Self {
        BackendManager {
            spec,
            census,
            tenant,
            role,
        }
    }
}

impl BackendManager {
    /// Through the server's backoff gate: a dead server gets one attempt at a time.
    pub async fn connect(&self) -> Result<BackendConn, BackendError> {
        let health = &self.spec.health;
        let _turn = health.gate().await;
        match BackendConn::connect(&self.spec).await {
            Ok(mut conn) => {
                health.connected();
                let info = ConnInfo {
                    id: self.census.next_id(),
                    tenant: std::sync::Mutex::new(self.tenant.clone()),
                    role: self.role.clone(),
                    user: self.spec.credentials.user.clone(),
                    database: self.spec.database.clone(),
                    server: self.spec.server.name.clone(),
                    host: self.spec.server.host.clone(),
                    port: self.spec.server.port,
                    pid: conn.pid(),
                    connected: std::time::SystemTime::now(),
                    active: Default::default(),
                    tls: conn.tls_description(),
                };
                conn.census = Some(self.census.add(Arc::new(info)));
                Ok(conn)
            }
            Err(e) => {
                if e.is_unreachable() {
                    health.unreachable(&e.to_string());
                }
                Err(e)
            }
        }
    }
}
