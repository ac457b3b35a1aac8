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

    async fn connect(&self) -> Result<BackendConn, BackendError> {
        BackendConn::connect(&self.spec).await
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
