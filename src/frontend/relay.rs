//! The hot path: messages between a client and its backend connection.
//!
//! One task drives both directions so the session state (transaction status, outstanding
//! requests, COPY) is plain local data, with no lock and no channel per message. Bytes are
//! forwarded as they arrive, in whole batches of messages per read, straight from the read
//! buffer; only the few tags that change state are looked at.

use crate::clients::stream::ClientStream;
use bytes::{Buf, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::backend::reset::Leftover;
use crate::backend::BackendConn;
use crate::protocol::framing::{cstr, INSPECT_LIMIT, MAX_SERVER_MESSAGE};
use crate::protocol::{ErrorReport, Scanner, Stop};
use crate::tenancy::row_context::RowBinding;

use super::error::SessionError;

const READ_CHUNK: usize = 8192;

pub enum RelayEnd {
    /// The client sent Terminate.
    Terminated,
    /// The client's socket closed or failed.
    ClientGone,
    /// The client broke the protocol; it has been told if it could be.
    ClientError(SessionError),
    /// The server closed the connection.
    ServerGone,
    /// pgtenant is shutting down and the client was between transactions.
    Shutdown,
}

pub struct RelayOutcome {
    pub end: RelayEnd,
    pub leftover: Leftover,
    pub bytes_in: u64,
    pub bytes_out: u64,
}

/// What the relay tracks about the backend session.
struct State {
    pending: u32,
    unsynced: bool,
    copy_in: bool,
    tx_status: u8,
}

/// Frontend message types a client may send once the session is running.
fn allowed_client_tag(tag: u8) -> bool {
    matches!(
        tag,
        b'Q' | b'P' | b'B' | b'D' | b'E' | b'C' | b'H' | b'S' | b'F' | b'd' | b'c' | b'f' | b'X'
    )
}

/// What a session-mode relay keeps to besides forwarding bytes.
pub struct SessionRules<'a> {
    /// The row-tier tenant the session is bound to: a client statement that may have cleared
    /// the context (`RESET`, `DISCARD`, `SET`) is followed by entering it again.
    pub row: Option<&'a RowBinding>,
    /// The tenant's caps on settings, applied after every transaction.
    pub limits: Option<&'a str>,
    /// Counters of the session's (tenant, role).
    pub stats: &'a crate::pool::stats::PoolStats,
    /// The client's registration: tells the relay when pgtenant shuts down.
    pub cancel: &'a crate::clients::cancel::CancelGuard,
    /// Transactions longer than this are logged.
    pub slow: Option<std::time::Duration>,
    /// NotificationResponses reach the client (`TierRules::notifications`).
    pub notifications: bool,
}

/// Between the client's requests (nothing in flight), the relay may run statements of its own
/// (see `SessionRules`).
pub async fn relay(
    client: &mut ClientStream,
    conn: &mut BackendConn,
    max_message: usize,
    rules: SessionRules<'_>,
) -> RelayOutcome {
    let SessionRules {
        row,
        limits,
        stats,
        cancel,
        slow,
        notifications,
    } = rules;
    let mut cbuf = BytesMut::with_capacity(READ_CHUNK);
    let mut cscan = Scanner::new(max_message, 0);
    let mut sscan = Scanner::new(MAX_SERVER_MESSAGE, INSPECT_LIMIT);
    let mut st = State {
        pending: 0,
        unsynced: false,
        copy_in: false,
        tx_status: conn.tx_status,
    };
    let (mut bytes_in, mut bytes_out) = (0u64, 0u64);
    // Tag of the last server message seen: an ErrorResponse right before the server hangs up is
    // its FATAL, already forwarded, so the client needs no second one.
    let mut last_server_tag = 0u8;
    let mut reenter = false;
    let mut transaction_ended = false;
    // For the pool's counters: when the running transaction began.
    let mut tx_began: Option<std::time::Instant> = None;
    let inspect_command_tags = row.is_some();

    let end = 'relay: loop {
        if cbuf.capacity() - cbuf.len() < 1024 {
            cbuf.reserve(READ_CHUNK);
        }
        if conn.read_buf.capacity() - conn.read_buf.len() < 1024 {
            conn.read_buf.reserve(READ_CHUNK);
        }
        // Nothing of the client's in flight and no transaction open: a shutdown may end it.
        let idle = st.pending == 0
            && !st.unsynced
            && !st.copy_in
            && st.tx_status == b'I'
            && cbuf.is_empty()
            && conn.read_buf.is_empty();
        if idle && cancel.is_draining() {
            break RelayEnd::Shutdown;
        }
        tokio::select! {
            _ = cancel.drained(), if idle => break RelayEnd::Shutdown,
            r = client.read_buf(&mut cbuf) => {
                match r {
                    Ok(0) | Err(_) => break RelayEnd::ClientGone,
                    Ok(_) => {}
                }
                let scanned = cscan.scan(&cbuf, |_| false, |tag, _| {
                    if !allowed_client_tag(tag) || tag == b'X' {
                        return false;
                    }
                    if matches!(tag, b'Q' | b'E') {
                        stats.queries.inc();
                    }
                    if tx_began.is_none() && tag != b'H' {
                        tx_began = Some(std::time::Instant::now());
                    }
                    match tag {
                        b'Q' | b'F' => st.pending += 1,
                        b'S' => {
                            st.pending += 1;
                            st.unsynced = false;
                        }
                        b'P' | b'B' | b'D' | b'E' | b'C' | b'H' => st.unsynced = true,
                        b'c' | b'f' => st.copy_in = false,
                        _ => {}
                    }
                    true
                });
                if scanned.forward > 0 {
                    if let Err(e) = conn.stream.write_all(&cbuf[..scanned.forward]).await {
                        conn.broken = true;
                        tracing::debug!(error = %e, "write to server failed");
                        break RelayEnd::ServerGone;
                    }
                    bytes_in += scanned.forward as u64;
                    cbuf.advance(scanned.forward);
                }
                match scanned.stop {
                    None => {}
                    Some(Stop::Refused(b'X')) => break RelayEnd::Terminated,
                    Some(Stop::Refused(tag)) => break RelayEnd::ClientError(SessionError::UnknownMessage(tag)),
                    Some(Stop::Frame(e)) => break RelayEnd::ClientError(SessionError::Frame(e)),
                }
                if scanned.need > cbuf.len() {
                    cbuf.reserve(scanned.need - cbuf.len());
                }
            }
            r = conn.stream.read_buf(&mut conn.read_buf) => {
                match r {
                    Ok(0) | Err(_) => {
                        conn.broken = true;
                        break RelayEnd::ServerGone;
                    }
                    Ok(_) => {}
                }
                let mut scanned;
                loop {
                    // Vec::new() does not allocate; only a ParameterStatus (rare) pushes.
                    let mut params: Vec<(String, String)> = Vec::new();
                    scanned = sscan.scan(&conn.read_buf, |t| t == b'Z' || t == b'S' || t == b'E' || (t == b'C' && inspect_command_tags) || (t == b'A' && !notifications), |tag, body| {
                        if tag == b'A' && !notifications {
                            return false;
                        }
                        last_server_tag = tag;
                        match (tag, body) {
                            (b'E', Some(b)) => {
                                if let Some(code) = crate::protocol::report::sqlstate_of(b) {
                                    stats.error(code);
                                }
                            }
                            (b'Z', Some(b)) => {
                                transaction_ended |= b.first() == Some(&b'I');
                                st.pending = st.pending.saturating_sub(1);
                                if b.first() == Some(&b'I') {
                                    // Every ReadyForQuery outside a block ends a transaction; a
                                    // pipelined next one started when this one ended.
                                    let took = tx_began.take().map(|at| at.elapsed()).unwrap_or_default();
                                    if slow.is_some_and(|s| took > s) {
                                        tracing::warn!(duration_ms = took.as_millis() as u64, "slow transaction");
                                    }
                                    stats.transaction(took.as_secs_f64(), 0, 0);
                                    if st.pending > 0 {
                                        tx_began = Some(std::time::Instant::now());
                                    }
                                }
                                st.copy_in = false;
                                if let Some(&s) = b.first() {
                                    st.tx_status = s;
                                }
                            }
                            (b'S', Some(b)) => {
                                if let Some((k, rest)) = cstr(b) {
                                    if let Some((v, _)) = cstr(rest) {
                                        params.push((
                                            String::from_utf8_lossy(k).into_owned(),
                                            String::from_utf8_lossy(v).into_owned(),
                                        ));
                                    }
                                }
                            }
                            (b'G', _) => st.copy_in = true,
                            (b'C', Some(b)) if inspect_command_tags => {
                                if let Some((t, _)) = cstr(b) {
                                    reenter |= t == b"SET" || t == b"RESET" || t.starts_with(b"DISCARD");
                                }
                            }
                            _ => {}
                        }
                        true
                    });
                    for (k, v) in params {
                        conn.set_param(k, v);
                    }
                    if scanned.forward > 0 {
                        if client.write_all(&conn.read_buf[..scanned.forward]).await.is_err() {
                            conn.read_buf.advance(scanned.forward);
                            break 'relay RelayEnd::ClientGone;
                        }
                        bytes_out += scanned.forward as u64;
                        conn.read_buf.advance(scanned.forward);
                    }
                    if let Some(Stop::Refused(b'A')) = scanned.stop {
                        // A notification, dropped: this tenant shares its database, where
                        // channels are everyone's (`TierRules::notifications`).
                        let b = &conn.read_buf;
                        let len = u32::from_be_bytes([b[1], b[2], b[3], b[4]]) as usize;
                        conn.read_buf.advance(1 + len);
                        continue;
                    }
                    break;
                }
                if let Some(Stop::Frame(e)) = scanned.stop {
                    conn.broken = true;
                    tracing::warn!(error = %e, "server sent an invalid message");
                    break RelayEnd::ServerGone;
                }
                if scanned.need > conn.read_buf.len() {
                    let more = scanned.need - conn.read_buf.len();
                    conn.read_buf.reserve(more);
                }
                // Only between requests, so nothing of the client's is in flight.
                let between = st.pending == 0 && !st.unsynced && !st.copy_in
                    && st.tx_status == b'I' && conn.read_buf.is_empty();
                if between && (reenter || (transaction_ended && limits.is_some())) {
                    let mut done = Ok(());
                    if let (Some(row), true) = (row, reenter) {
                        done = conn.bind_row(row).await;
                    }
                    if let (Ok(()), Some(sql), true) = (&done, limits, transaction_ended) {
                        done = conn.execute(sql).await;
                    }
                    reenter = false;
                    transaction_ended = false;
                    if let Err(e) = done {
                        tracing::error!(error = %e, "could not restore the tenant's session rules; ending the session");
                        conn.broken = true;
                        let report = ErrorReport::fatal(
                            crate::protocol::sqlstate::CONNECTION_FAILURE,
                            e.to_string(),
                        );
                        send_report(client, &report).await;
                        last_server_tag = b'E';
                        break RelayEnd::ServerGone;
                    }
                }
            }
        }
    };

    conn.tx_status = st.tx_status;
    if let RelayEnd::ClientError(e) = &end {
        // Only tell the client if it is not in the middle of receiving a server message.
        if sscan.at_boundary() {
            if let Some(report) = e.report() {
                send_report(client, &report).await;
            }
        }
    }
    if matches!(end, RelayEnd::Shutdown) {
        let report = ErrorReport::fatal(
            crate::protocol::sqlstate::ADMIN_SHUTDOWN,
            "terminating connection: pgtenant is shutting down",
        );
        send_report(client, &report).await;
    }
    if matches!(end, RelayEnd::ServerGone) && sscan.at_boundary() && last_server_tag != b'E' {
        let report = ErrorReport::fatal(
            crate::protocol::sqlstate::CONNECTION_FAILURE,
            "server closed the connection unexpectedly",
        );
        send_report(client, &report).await;
    }
    stats.bytes_in.inc_by(bytes_in);
    stats.bytes_out.inc_by(bytes_out);
    RelayOutcome {
        end,
        leftover: Leftover {
            pending: st.pending,
            unsynced: st.unsynced,
            copy_in: st.copy_in,
            scanner: sscan,
        },
        bytes_in,
        bytes_out,
    }
}

pub async fn send_report(client: &mut ClientStream, report: &ErrorReport) {
    let mut buf = BytesMut::with_capacity(128);
    report.encode(&mut buf);
    let _ = client.write_all(&buf).await;
    let _ = client.flush().await;
}
