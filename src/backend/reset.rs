//! Making a backend connection fit for its next client.
//!
//! A client can leave at any moment: between transactions, inside one, while a query runs, in
//! the middle of a result or a COPY. The reset finishes or aborts whatever it left behind, then
//! clears session state. Anything uncertain marks the connection broken, so the pool drops it
//! and PostgreSQL rolls the session back as the socket closes; a half-cleaned connection is never
//! handed to anyone else.

use std::time::Duration;

use tokio::io::AsyncReadExt;

use crate::protocol::Scanner;

use super::connection::{BackendConn, BackendError};

/// Statement that clears session state (settings, prepared statements, temp tables, advisory
/// locks, LISTEN) between clients, as PgBouncer's default server_reset_query.
pub const RESET_QUERY: &str = "DISCARD ALL";

/// What the relay knew about the backend when its client left.
#[derive(Debug, Clone)]
pub struct Leftover {
    /// Queries, Syncs and function calls sent but not yet answered by ReadyForQuery.
    pub pending: u32,
    /// Extended-protocol messages sent since the last Sync.
    pub unsynced: bool,
    /// The server is waiting for COPY data from the client.
    pub copy_in: bool,
    /// The relay's scanner over server output, which knows if a message was cut off.
    pub scanner: Scanner,
}

pub async fn reset(
    conn: &mut BackendConn,
    left: Leftover,
    timeout: Duration,
) -> Result<(), BackendError> {
    let server = conn.server().name.clone();
    match tokio::time::timeout(timeout, reset_inner(conn, left)).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => {
            conn.mark_broken();
            Err(e)
        }
        Err(_) => {
            conn.mark_broken();
            Err(BackendError::Timeout { server })
        }
    }
}

async fn reset_inner(conn: &mut BackendConn, mut left: Leftover) -> Result<(), BackendError> {
    if conn.is_broken() {
        return Ok(());
    }
    if left.copy_in || left.unsynced {
        // Finishing these would need a Sync or CopyDone, which would commit what the client
        // left half-done. Closing the socket makes PostgreSQL roll it back instead.
        if left.pending > 0 || left.unsynced {
            let _ = conn.cancel_target().send().await;
        }
        conn.mark_broken();
        return Ok(());
    }
    if left.pending > 0 {
        let _ = conn.cancel_target().send().await;
    }
    if left.pending > 0 || !left.scanner.at_boundary() {
        drain(conn, &mut left).await?;
        if conn.is_broken() {
            return Ok(());
        }
    }
    if conn.tx_status() != b'I' {
        conn.execute("ROLLBACK").await?;
    }
    conn.execute(RESET_QUERY).await?;
    // DISCARD ALL dropped every prepared statement and setting, the row tier's context among
    // them: the connection is bound to no tenant until it is bound again.
    conn.prepared.clear();
    conn.applied_settings = std::sync::Arc::from("");
    conn.bound = None;
    Ok(())
}

/// Reads and discards server output until every pending request has its ReadyForQuery.
async fn drain(conn: &mut BackendConn, left: &mut Leftover) -> Result<(), BackendError> {
    let server = conn.server().name.clone();
    loop {
        let mut tx_status = None;
        let mut finished = 0u32;
        let mut copy_in = false;
        let scanned = left.scanner.scan(
            &conn.read_buf,
            |tag| tag == b'Z',
            |tag, body| {
                match tag {
                    b'Z' => {
                        finished += 1;
                        tx_status = body.and_then(|b| b.first().copied());
                    }
                    b'G' | b'W' => copy_in = true,
                    _ => {}
                }
                true
            },
        );
        if let Some(stop) = scanned.stop {
            return Err(BackendError::Protocol {
                server: server.clone(),
                reason: format!("{stop:?}"),
            });
        }
        bytes::Buf::advance(&mut conn.read_buf, scanned.forward);
        if let Some(s) = tx_status {
            conn.tx_status = s;
        }
        left.pending = left.pending.saturating_sub(finished);
        if copy_in {
            conn.mark_broken();
            return Ok(());
        }
        if left.pending == 0 && left.scanner.at_boundary() && conn.read_buf.is_empty() {
            return Ok(());
        }
        conn.read_buf.reserve(scanned.need.max(8192));
        match conn.stream.read_buf(&mut conn.read_buf).await {
            Ok(0) | Err(_) => {
                conn.mark_broken();
                return Ok(());
            }
            Ok(_) => {}
        }
    }
}
