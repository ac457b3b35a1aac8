//! bb8's view of a backend connection.

use crate::backend::{BackendConn, BackendError, ConnectSpec};

#[derive(Debug)]
pub struct BackendManager {
    spec: ConnectSpec,
}

impl BackendManager {
    pub fn new(spec: ConnectSpec) -> Self {
        BackendManager { spec }
    }
}

impl bb8::ManageConnection for BackendManager {
    type Connection = BackendConn;
    type Error = BackendError;

    /// Through the server's backoff gate: a dead server gets one attempt at a time.
    async fn connect(&self) -> Result<BackendConn, BackendError> {
        let health = &self.spec.health;
        let _turn = health.gate().await;
        match BackendConn::connect(&self.spec).await {
            Ok(conn) => {
                health.connected();
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

    /// Not called: pools run with test_on_check_out(false), because every session already
    /// starts with the reset's round trip proving the connection works.
    async fn is_valid(&self, conn: &mut BackendConn) -> Result<(), BackendError> {
        conn.execute("").await
    }

    fn has_broken(&self, conn: &mut BackendConn) -> bool {
        conn.is_broken()
    }
}
