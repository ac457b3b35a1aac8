//! Transaction pooling: a client borrows a backend from its first message of a transaction to
//! the ReadyForQuery that ends it with status 'I'.
//!
//! Between transactions the client's session lives in `ClientState`: settings are replayed and
//! named statements re-prepared (under pool-wide names) on whichever backend serves the next
//! transaction, pipelined in front of the client's own messages, with the responses to what
//! pgtenant injected swallowed. Every message sent to the backend gets an entry in a queue of
//! expected responses, so each response is matched to its request (PgDog's design):
//! responses to client messages are forwarded, to injected ones swallowed, and responses
//! pgtenant answers itself (ParseComplete for a statement the backend already has,
//! CloseComplete for a client Close) are emitted in order.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use crate::frontend::stream::ClientStream;
use bytes::{Buf, BufMut, Bytes, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::sql_policy::{
    classify, deallocated_name, may_change_settings_unseen, may_matter,
    opens_read_only_transaction, statements, Statement,
};
use crate::backend::reset::Leftover;
use crate::backend::stream::TryWrite;
use crate::config::{SessionFeatures, Tier};
use crate::pool::{Patience, PoolError, PooledBackend, ReadPolicy, TenantPool};
use crate::protocol::framing::{cstr, HEADER_LEN};
use crate::protocol::report::Severity;
use crate::protocol::{sqlstate, ErrorReport, FrameError, Scanner};
use crate::tenancy::row_context;

use super::buffers;
use super::client_state::{ClientState, ClientStatement, SettingOp};
use super::error::SessionError;
use crate::clients::cancel::CancelGuard;

const READ_CHUNK: usize = 8192;
/// Largest server message whose body is examined (CommandComplete, ParameterStatus, ReadyForQuery).
const INSPECT_LIMIT: usize = 64 * 1024;
const MAX_SERVER_MESSAGE: usize = 0x3fff_ffff;
const PARSE_COMPLETE: &[u8] = b"1\0\0\0\x04";
/// Applied-settings marker of a connection whose tier-pinned setting a client changed: equal to
/// no client's script, so the next transaction on it starts with RESET ALL.
const PIN_CHANGED: &str = "\0pin changed";
const CLOSE_COMPLETE: &[u8] = b"3\0\0\0\x04";

/// The response(s) one message sent to the backend produces.
#[derive(Debug, Clone)]
enum Resp {
    Parse(Option<Arc<str>>),
    Bind,
    DescribeStatement,
    DescribePortal,
    Execute,
    Close(Option<Arc<str>>),
    Sync,
    Query,
    FunctionCall,
    /// The row tier's binding of the connection to a tenant (an Execute).
    Enter(Arc<str>),
    /// A Query that opens a transaction and fails it on purpose: the client's transaction was
    /// lost with its server connection, and its next statements must fail as PostgreSQL's
    /// would in an aborted transaction, until it ends it.
    Abort,
}

impl Resp {
    /// Ends with ReadyForQuery (an error does not end it).
    fn ends_with_ready(&self) -> bool {
        matches!(
            self,
            Resp::Sync | Resp::Query | Resp::FunctionCall | Resp::Abort
        )
    }
}

#[derive(Debug)]
enum Item {
    /// A client message: its responses go to the client.
    Client(Resp),
    /// A message pgtenant injected: its responses are swallowed.
    Proxy(Resp),
    /// Bytes pgtenant answers itself, in order.
    Synthetic(Bytes),
    /// The client ended a COPY (CopyDone/CopyFail) before the server's CopyInResponse was
    /// seen; marks which Syncs were sent during the copy (the server ignores those).
    CopyEnd,
}

pub enum TxEnd {
    Terminated,
    /// pgtenant is shutting down and the client is between transactions.
    Shutdown,
    ClientGone,
    ClientError(SessionError),
    ServerGone,
    Timeout(ErrorReport),
    Pool(PoolError),
}

pub struct TxOutcome {
    pub end: TxEnd,
    /// The backend still linked when the client left, with what it was doing and the pool it
    /// belongs to (the primary's or a replica's).
    pub backend: Option<(Box<PooledBackend>, Leftover, Arc<TenantPool>)>,
    pub bytes_in: u64,
    pub bytes_out: u64,
}

pub struct Engine {
    /// The tenant's (primary) pool: statement names, the row binding, its replicas.
    pool: Arc<TenantPool>,
    /// Where reads go, and whether this session's transactions are all reads.
    reads: ReadPolicy,
    /// The next transaction was seen to start READ ONLY (read/write split).
    read_hint: bool,
    /// The pool of the linked backend when it is not `pool` (a replica's).
    serving: Option<Arc<TenantPool>>,
    /// A FATAL the server sent before closing the linked connection, told to the client as an
    /// ERROR (its own connection stays usable).
    server_fatal: Option<Box<ErrorReport>>,
    /// The client's explicit transaction died with its server connection: the next one starts
    /// aborted, so the client must end it (ROLLBACK) as with any failed transaction.
    aborted_block: bool,
    /// A BEGIN completed since the client last saw ReadyForQuery.
    began_in_batch: bool,
    /// The server connection of a client idle in its transaction was lost: the answer to the
    /// client's next request.
    deferred_error: Option<Box<ErrorReport>>,
    /// When the linked backend was checked out; when the transaction not yet counted began
    /// (None between transactions of a link that outlives them: pipelined or pinned); and the
    /// byte counts at the last counted transaction.
    linked_at: Option<std::time::Instant>,
    tx_began: Option<std::time::Instant>,
    counted: (u64, u64),
    /// When the oldest client request still waiting for its ReadyForQuery was received.
    request_at: Option<std::time::Instant>,
    /// Transactions longer than this are logged.
    slow: Option<Duration>,
    /// The session feature that pinned this client to its server connection
    /// (`session_features = pin`), and whether a DISCARD ALL asked to let it go.
    pinned: Option<&'static str>,
    unpin_requested: bool,
    state: ClientState,
    cancel: CancelGuard,
    max_message: usize,
    max_prepared: usize,
    idle_tx_timeout: Option<Duration>,
    /// Boxed so an idle client's engine does not carry a connection-sized empty slot.
    backend: Option<Box<PooledBackend>>,
    queue: VecDeque<Item>,
    unsynced: bool,
    /// The server is reading COPY data from the client (CopyInResponse seen, not yet ended).
    copy: bool,
    /// A refused extended-protocol message: drop the client's messages until Sync.
    skipping: bool,
    tx_status: u8,
    tx_failed: bool,
    pending_ops: Vec<SettingOp>,
    /// Schema tier: the transaction may have changed `search_path` where no parser sees it
    /// (`set_config()`, dynamic SQL); the pinned value is restored before the next one.
    unseen_changes: bool,
    /// Body bytes of the server message being streamed, and whether it goes to the client.
    srv_remaining: usize,
    srv_forward: bool,
    srv_last_tag: u8,
    out: BytesMut,
    obuf: BytesMut,
    bytes_in: u64,
    bytes_out: u64,
}

impl Engine {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        pool: Arc<TenantPool>,
        reads: ReadPolicy,
        state: ClientState,
        cancel: CancelGuard,
        max_message: usize,
        max_prepared: usize,
        idle_tx_timeout: u64,
    ) -> Self {
        Engine {
            pool,
            reads,
            read_hint: false,
            serving: None,
            server_fatal: None,
            aborted_block: false,
            began_in_batch: false,
            deferred_error: None,
            linked_at: None,
            tx_began: None,
            counted: (0, 0),
            request_at: None,
            slow: None,
            pinned: None,
            unpin_requested: false,
            state,
            cancel,
            max_message,
            max_prepared: max_prepared.max(1),
            idle_tx_timeout: (idle_tx_timeout > 0).then(|| Duration::from_secs(idle_tx_timeout)),
            backend: None,
            queue: VecDeque::new(),
            unsynced: false,
            copy: false,
            skipping: false,
            tx_status: b'I',
            tx_failed: false,
            pending_ops: Vec::new(),
            unseen_changes: false,
            srv_remaining: 0,
            srv_forward: true,
            srv_last_tag: 0,
            out: BytesMut::new(),
            obuf: BytesMut::new(),
            bytes_in: 0,
            bytes_out: 0,
        }
    }

    /// The client's registration (cancel key, operator termination).
    pub fn cancel(&self) -> &CancelGuard {
        &self.cancel
    }

    /// Logs transactions that take longer than `threshold`.
    pub fn with_slow_log(mut self, threshold: Option<Duration>) -> Self {
        self.slow = threshold;
        self
    }

    /// By reference: the engine lives in the session's state, not a second time in this
    /// future's.
    pub async fn run(&mut self, client: &mut ClientStream) -> TxOutcome {
        let end = loop {
            // Between transactions a client holds no buffers and no transaction state on the
            // stack: thousands of idle clients then cost little more than their sockets.
            buffers::give(&mut self.out);
            buffers::give(&mut self.obuf);
            if self.cancel.is_draining() {
                break TxEnd::Shutdown;
            }
            let first = tokio::select! {
                r = wait_for_input(client) => match r {
                    Ok(b) => b,
                    Err(()) => break TxEnd::ClientGone,
                },
                _ = self.cancel.drained() => break TxEnd::Shutdown,
            };
            // Boxed: this state lives only while the client is active.
            match Box::pin(self.active(client, first)).await {
                Ok(()) => {}
                // Lost at a message boundary: the client is told, and keeps its connection;
                // unless it was pinned, for then its session state went with the server
                // connection, and its session ends as a session-mode one would.
                Err(TxEnd::ServerGone) if self.srv_remaining == 0 && self.pinned.is_none() => {
                    if Box::pin(self.recover_from_lost_server(client))
                        .await
                        .is_err()
                    {
                        break TxEnd::ClientGone;
                    }
                }
                Err(e) => break e,
            }
        };
        Box::pin(self.finish(client, end)).await
    }

    /// Serves the client from its first bytes after idling until it is idle again, with no
    /// backend and nothing buffered.
    async fn active(&mut self, client: &mut ClientStream, mut cbuf: BytesMut) -> Result<(), TxEnd> {
        if self.out.capacity() == 0 {
            self.out = buffers::take();
        }
        if self.obuf.capacity() == 0 {
            self.obuf = buffers::take();
        }
        let r = self.serve_active(client, &mut cbuf).await;
        buffers::give(&mut cbuf);
        r
    }

    async fn serve_active(
        &mut self,
        client: &mut ClientStream,
        cbuf: &mut BytesMut,
    ) -> Result<(), TxEnd> {
        self.bytes_in += cbuf.len() as u64;
        self.on_client_bytes(cbuf).await?;
        self.flush(client).await?;
        loop {
            if self.backend.is_none() && cbuf.is_empty() {
                return Ok(());
            }
            if cbuf.capacity() - cbuf.len() < 1024 {
                cbuf.reserve(READ_CHUNK);
            }
            if let Some(be) = self.backend.as_mut() {
                if be.read_buf.capacity() - be.read_buf.len() < 1024 {
                    be.read_buf.reserve(READ_CHUNK);
                }
            }
            let in_tx = self.backend.is_some() && self.tx_status != b'I';
            let idle_limit = self.idle_tx_timeout.filter(|_| in_tx);
            // Boxed, and only when configured: an inline timer would enlarge (and over-align)
            // the state every transaction allocates.
            let mut idle_timer = idle_limit.map(|d| Box::pin(tokio::time::sleep(d)));
            let backend = &mut self.backend;
            tokio::select! {
                // Server output first (no random branch order): it is what a transaction
                // waits for, and the client is only polled when the server has nothing.
                biased;
                r = async {
                    match backend {
                        Some(be) => be.read_more().await,
                        None => std::future::pending().await,
                    }
                } => {
                    match r {
                        Ok(0) | Err(_) => {
                            if let Some(be) = self.backend.as_mut() {
                                be.mark_broken();
                            }
                            return Err(TxEnd::ServerGone);
                        }
                        Ok(_) => {}
                    }
                    self.on_server_bytes()?;
                }
                r = client.read_buf(&mut *cbuf) => {
                    match r {
                        Ok(0) | Err(_) => return Err(TxEnd::ClientGone),
                        Ok(n) => self.bytes_in += n as u64,
                    }
                    self.on_client_bytes(cbuf).await?;
                }
                _ = async {
                    match idle_timer.as_mut() {
                        Some(t) => t.as_mut().await,
                        None => std::future::pending().await,
                    }
                } => {
                    return Err(TxEnd::Timeout(ErrorReport::fatal(
                        "25P03",
                        "terminating connection due to idle-in-transaction timeout",
                    )));
                }
            }
            self.flush(client).await?;
        }
    }

    async fn finish(&mut self, client: &mut ClientStream, end: TxEnd) -> TxOutcome {
        self.unpin();
        self.note_release();
        let backend = self.backend.take().map(|be| {
            let pending = self
                .queue
                .iter()
                .filter(|i| matches!(i, Item::Client(r) | Item::Proxy(r) if r.ends_with_ready()))
                .count() as u32;
            let left = Leftover {
                pending,
                unsynced: self.unsynced,
                copy_in: self.copy,
                scanner: Scanner::mid_message(
                    MAX_SERVER_MESSAGE,
                    INSPECT_LIMIT,
                    self.srv_remaining,
                ),
            };
            let pool = self.serving.take().unwrap_or_else(|| self.pool.clone());
            (be, left, pool)
        });
        TxOutcome {
            end,
            backend,
            bytes_in: self.bytes_in,
            bytes_out: self.bytes_out,
        }
        .report_to(client, self.srv_remaining == 0, self.srv_last_tag)
        .await
    }

    /// Sends what is ready: requests to the backend, responses to the client; then lets the
    /// backend go if the transaction is over.
    async fn flush(&mut self, client: &mut ClientStream) -> Result<(), TxEnd> {
        if !self.out.is_empty() {
            if let Some(be) = self.backend.as_mut() {
                if send_all(&mut be.stream, &self.out).await.is_err() {
                    be.mark_broken();
                    return Err(TxEnd::ServerGone);
                }
            }
            self.out.clear();
        }
        self.emit_synthetics();
        self.maybe_release();
        if !self.obuf.is_empty() {
            if send_all(client, &self.obuf).await.is_err() {
                return Err(TxEnd::ClientGone);
            }
            self.bytes_out += self.obuf.len() as u64;
            self.obuf.clear();
        }
        Ok(())
    }

    fn maybe_release(&mut self) {
        let done = self.pinned.is_none()
            && self.queue.is_empty()
            && self.tx_status == b'I'
            && !self.unsynced
            && !self.copy
            && self.srv_remaining == 0;
        if !done {
            return;
        }
        if let Some(be) = &self.backend {
            if !be.read_buf.is_empty() {
                return;
            }
        }
        if let Some(be) = self.backend.take() {
            self.cancel.unlink();
            self.note_release();
            match self.serving.take() {
                Some(p) => p.park(be),
                None => self.pool.park(be),
            }
        }
    }

    fn emit_synthetics(&mut self) {
        loop {
            match self.queue.front() {
                Some(Item::Synthetic(_)) => {
                    if let Some(Item::Synthetic(b)) = self.queue.pop_front() {
                        self.obuf.extend_from_slice(&b);
                    }
                }
                Some(Item::CopyEnd) => {
                    self.queue.pop_front();
                }
                _ => return,
            }
        }
    }

    async fn on_client_bytes(&mut self, cbuf: &mut BytesMut) -> Result<(), TxEnd> {
        loop {
            if cbuf.len() < HEADER_LEN {
                return Ok(());
            }
            let tag = cbuf[0];
            let len = u32::from_be_bytes([cbuf[1], cbuf[2], cbuf[3], cbuf[4]]);
            if len < 4 {
                return Err(TxEnd::ClientError(SessionError::Frame(
                    FrameError::BadLength { tag, len },
                )));
            }
            let body_len = len as usize - 4;
            if body_len > self.max_message {
                return Err(TxEnd::ClientError(SessionError::Frame(
                    FrameError::TooLarge {
                        tag,
                        len: len as usize,
                        max: self.max_message + 4,
                    },
                )));
            }
            if cbuf.len() < HEADER_LEN + body_len {
                cbuf.reserve(HEADER_LEN + body_len - cbuf.len());
                return Ok(());
            }
            // Handled in place (no split_to: that would make the buffer shared and allocate).
            let n = HEADER_LEN + body_len;
            self.on_client_message(tag, &cbuf[..n]).await?;
            cbuf.advance(n);
        }
    }

    async fn on_client_message(&mut self, tag: u8, msg: &[u8]) -> Result<(), TxEnd> {
        let body = &msg[HEADER_LEN..];
        if !matches!(
            tag,
            b'Q' | b'P'
                | b'B'
                | b'D'
                | b'E'
                | b'C'
                | b'H'
                | b'S'
                | b'F'
                | b'd'
                | b'c'
                | b'f'
                | b'X'
        ) {
            return Err(TxEnd::ClientError(SessionError::UnknownMessage(tag)));
        }
        if tag == b'X' {
            return Err(TxEnd::Terminated);
        }
        if self.skipping && tag != b'S' {
            return Ok(());
        }
        if self.backend.is_some() && self.tx_began.is_none() {
            // The next transaction on a link that outlived the last one.
            self.tx_began = Some(std::time::Instant::now());
        }
        if matches!(tag, b'Q' | b'E') {
            self.pool.stats().queries.inc();
        }
        if matches!(tag, b'Q' | b'S' | b'F') && self.request_at.is_none() {
            self.request_at = Some(std::time::Instant::now());
        }
        match tag {
            b'Q' => {
                if self.deallocated_locally(body) {
                    return Ok(());
                }
                let text = cstr(body).map(|(t, _)| t).unwrap_or(body);
                let (ops, found) = inspect_sql(text);
                let (pin, refusal) = self.pin_or_refuse(found);
                if let Some(what) = refusal {
                    let report = refusal_report(what);
                    if self.backend.is_none() {
                        report.encode(&mut self.obuf);
                        ready_for_query(&mut self.obuf, self.tx_status);
                        return Ok(());
                    }
                    // Inside a transaction the refusal must fail it, as a server error would.
                    let raise = raise_statement(&report);
                    self.link().await?;
                    put_query(&mut self.out, &raise);
                    self.queue.push_back(Item::Client(Resp::Query));
                    return Ok(());
                }
                if self.backend.is_none() {
                    self.read_hint = self.reads.split && opens_read_only_transaction(text);
                }
                if !self.link_or_refuse(tag).await? {
                    return Ok(());
                }
                self.pending_ops.extend(ops);
                self.unseen_changes |=
                    self.watches_unseen_changes() && may_change_settings_unseen(text);
                self.note_pinning(pin, text);
                self.out.extend_from_slice(msg);
                self.queue.push_back(Item::Client(Resp::Query));
            }
            b'P' => {
                let (name, rest) = cstr(body).ok_or_else(|| malformed(tag))?;
                let query = cstr(rest).map(|(q, _)| q).ok_or_else(|| malformed(tag))?;
                let (ops, found) = inspect_sql(query);
                let (pin, refusal) = self.pin_or_refuse(found);
                if let Some(what) = refusal {
                    self.refuse_extended(refusal_report(what));
                    return Ok(());
                }
                if pin.is_some() && !self.link_or_refuse(tag).await? {
                    return Ok(());
                }
                self.note_pinning(pin, query);
                if self.backend.is_none() {
                    self.read_hint = self.reads.split && opens_read_only_transaction(query);
                }
                self.pending_ops.extend(ops);
                self.unsynced = true;
                let unseen = self.watches_unseen_changes() && may_change_settings_unseen(query);
                if name.is_empty() {
                    self.unseen_changes |= unseen;
                    if !self.link_or_refuse(tag).await? {
                        return Ok(());
                    }
                    self.out.extend_from_slice(msg);
                    self.queue.push_back(Item::Client(Resp::Parse(None)));
                    return Ok(());
                }
                let global = self.pool.statement_name(rest);
                let parse = build_message(b'P', &[global.as_bytes(), b"\0", rest]);
                let stmt = Arc::new(ClientStatement {
                    global: global.clone(),
                    parse: parse.clone(),
                    unseen_changes: unseen,
                });
                self.state
                    .statements
                    .insert(Bytes::copy_from_slice(name), stmt);
                if self.backend.is_none() && self.pool.is_parsed(&global) {
                    // Known-good SQL outside a transaction: answer now and prepare it on
                    // whichever backend first needs it. Waiting for a backend here would
                    // stall clients (pgbench -M prepared) that prepare synchronously while
                    // another of their connections holds a transaction open.
                    self.queue
                        .push_back(Item::Synthetic(Bytes::from_static(PARSE_COMPLETE)));
                    return Ok(());
                }
                if !self.link_or_refuse(tag).await? {
                    return Ok(());
                }
                let be = self.backend.as_mut().ok_or(TxEnd::ServerGone)?;
                if be.prepared.contains(&global) {
                    self.queue
                        .push_back(Item::Synthetic(Bytes::from_static(PARSE_COMPLETE)));
                } else {
                    be.prepared.insert(global.clone());
                    self.out.extend_from_slice(&parse);
                    self.queue
                        .push_back(Item::Client(Resp::Parse(Some(global.clone()))));
                    self.evict(&global);
                }
            }
            b'B' => {
                let (portal, rest) = cstr(body).ok_or_else(|| malformed(tag))?;
                let (name, params) = cstr(rest).ok_or_else(|| malformed(tag))?;
                if !self.link_or_refuse(tag).await? {
                    return Ok(());
                }
                self.unsynced = true;
                match self.named(name) {
                    Some(stmt) => {
                        self.unseen_changes |= stmt.unseen_changes;
                        self.ensure_prepared(&stmt);
                        put_message(
                            &mut self.out,
                            b'B',
                            &[portal, b"\0", stmt.global.as_bytes(), b"\0", params],
                        );
                    }
                    None => self.out.extend_from_slice(msg),
                }
                self.queue.push_back(Item::Client(Resp::Bind));
            }
            b'D' => {
                let kind = *body.first().ok_or_else(|| malformed(tag))?;
                let (name, _) = cstr(&body[1..]).ok_or_else(|| malformed(tag))?;
                if !self.link_or_refuse(tag).await? {
                    return Ok(());
                }
                self.unsynced = true;
                if kind == b'S' {
                    match self.named(name) {
                        Some(stmt) => {
                            self.ensure_prepared(&stmt);
                            put_message(
                                &mut self.out,
                                b'D',
                                &[b"S", stmt.global.as_bytes(), b"\0"],
                            );
                        }
                        None => self.out.extend_from_slice(msg),
                    }
                    self.queue.push_back(Item::Client(Resp::DescribeStatement));
                } else {
                    self.out.extend_from_slice(msg);
                    self.queue.push_back(Item::Client(Resp::DescribePortal));
                }
            }
            b'C' => {
                let kind = *body.first().ok_or_else(|| malformed(tag))?;
                let (name, _) = cstr(&body[1..]).ok_or_else(|| malformed(tag))?;
                self.unsynced = true;
                if kind == b'S' && !name.is_empty() {
                    // The statement stays prepared on backends for other clients.
                    self.state.statements.remove(name);
                    self.queue
                        .push_back(Item::Synthetic(Bytes::from_static(CLOSE_COMPLETE)));
                } else {
                    if !self.link_or_refuse(tag).await? {
                        return Ok(());
                    }
                    self.out.extend_from_slice(msg);
                    self.queue.push_back(Item::Client(Resp::Close(None)));
                }
            }
            b'E' => {
                if !self.link_or_refuse(tag).await? {
                    return Ok(());
                }
                self.unsynced = true;
                self.out.extend_from_slice(msg);
                self.queue.push_back(Item::Client(Resp::Execute));
            }
            b'S' if self.copy => {
                // PostgreSQL ignores Sync while it is reading COPY data.
                if self.backend.is_some() {
                    self.out.extend_from_slice(msg);
                }
            }
            b'c' | b'f' => {
                if self.backend.is_some() {
                    self.out.extend_from_slice(msg);
                    if self.copy {
                        self.copy = false;
                    } else {
                        self.queue.push_back(Item::CopyEnd);
                    }
                }
            }
            b'S' => {
                self.skipping = false;
                self.unsynced = false;
                let answered_locally = self
                    .queue
                    .iter()
                    .all(|i| matches!(i, Item::Synthetic(_) | Item::CopyEnd));
                if self.backend.is_none() && answered_locally {
                    // Nothing since the last Sync needed a backend (statements answered
                    // locally, a refused Parse, or an empty pipeline).
                    let mut z = BytesMut::with_capacity(6);
                    ready_for_query(&mut z, self.tx_status);
                    self.queue.push_back(Item::Synthetic(z.freeze()));
                    return Ok(());
                }
                if !self.link_or_refuse(tag).await? {
                    return Ok(());
                }
                self.out.extend_from_slice(msg);
                self.queue.push_back(Item::Client(Resp::Sync));
            }
            b'H' => {
                if self.backend.is_some() {
                    self.out.extend_from_slice(msg);
                }
            }
            b'F' => {
                if !self.link_or_refuse(tag).await? {
                    return Ok(());
                }
                self.out.extend_from_slice(msg);
                self.queue.push_back(Item::Client(Resp::FunctionCall));
            }
            // CopyData: only meaningful with a backend in COPY.
            _ => {
                if self.backend.is_some() {
                    self.out.extend_from_slice(msg);
                }
            }
        }
        Ok(())
    }

    /// Schema tier: the pinned `search_path` is restored after a transaction that may have
    /// changed it where no parser sees it.
    fn watches_unseen_changes(&self) -> bool {
        self.pool.tenant().tier.rules().pinned_setting.is_some()
    }

    fn named(&self, name: &[u8]) -> Option<Arc<ClientStatement>> {
        if name.is_empty() {
            return None;
        }
        self.state.statements.get(name).cloned()
    }

    /// Prepares `stmt` on the linked backend if it lacks it, ahead of the message that needs it.
    fn ensure_prepared(&mut self, stmt: &ClientStatement) {
        let Some(be) = self.backend.as_mut() else {
            return;
        };
        if be.prepared.contains(&stmt.global) {
            return;
        }
        be.prepared.insert(stmt.global.clone());
        self.out.extend_from_slice(&stmt.parse);
        self.queue
            .push_back(Item::Proxy(Resp::Parse(Some(stmt.global.clone()))));
        self.evict(&stmt.global.clone());
    }

    /// SQL `DEALLOCATE name` of a statement the client prepared at protocol level: its name
    /// exists only here (backends know it by a shared name), so it is closed as a protocol
    /// Close would be and answered here. Only when every earlier response is known, so the
    /// ReadyForQuery status is right; true if answered.
    fn deallocated_locally(&mut self, body: &[u8]) -> bool {
        let text = cstr(body).map(|(t, _)| t).unwrap_or(body);
        // One comparison for every other query.
        let head = text.trim_ascii_start();
        if !head
            .get(..10)
            .is_some_and(|h| h.eq_ignore_ascii_case(b"DEALLOCATE"))
        {
            return false;
        }
        let Some(name) = std::str::from_utf8(text).ok().and_then(deallocated_name) else {
            return false;
        };
        let pending = self
            .queue
            .iter()
            .any(|i| matches!(i, Item::Client(_) | Item::Proxy(_)));
        if pending || !self.state.statements.contains_key(name.as_bytes()) {
            return false;
        }
        let mut b = BytesMut::with_capacity(64);
        if self.tx_status == b'E' {
            ErrorReport::error(
                sqlstate::IN_FAILED_TRANSACTION,
                "current transaction is aborted, commands ignored until end of transaction block",
            )
            .encode(&mut b);
        } else {
            self.state.statements.remove(name.as_bytes());
            put_message(&mut b, b'C', &[b"DEALLOCATE\0"]);
        }
        ready_for_query(&mut b, self.tx_status);
        self.queue.push_back(Item::Synthetic(b.freeze()));
        self.request_at = None;
        true
    }

    /// Closes the least recently used statements beyond the per-backend limit.
    fn evict(&mut self, keep: &Arc<str>) {
        let Some(be) = self.backend.as_mut() else {
            return;
        };
        for name in be.prepared.overflow(self.max_prepared, &[keep]) {
            put_message(&mut self.out, b'C', &[b"S", name.as_bytes(), b"\0"]);
            self.queue.push_back(Item::Proxy(Resp::Close(Some(name))));
        }
    }

    /// Splits what a statement uses that outlives its transaction into what pins the client
    /// (the tenant pins) and what is refused (it refuses).
    fn pin_or_refuse(
        &self,
        found: Option<&'static str>,
    ) -> (Option<&'static str>, Option<&'static str>) {
        match self.pool.tenant().session_features {
            SessionFeatures::Pin => (found, None),
            SessionFeatures::Refuse => (None, found),
        }
    }

    /// A statement with a session feature (`pin`) keeps the client on its server connection;
    /// a DISCARD ALL of a pinned client lets it go once it has run.
    fn note_pinning(&mut self, pin: Option<&'static str>, sql: &[u8]) {
        if let (Some(what), None) = (pin, self.pinned) {
            self.pinned = Some(what);
            self.pool.stats().pinned.inc();
            let shown = String::from_utf8_lossy(&sql[..sql.len().min(200)]);
            tracing::info!(
                tenant = %self.pool.tenant().id,
                feature = what,
                statement = %shown,
                "client pinned to its server connection until it disconnects or runs DISCARD ALL"
            );
        }
        if self.pinned.is_some() {
            let text = String::from_utf8_lossy(sql);
            self.unpin_requested |= statements(&text)
                .into_iter()
                .any(|s| matches!(classify(s), Statement::DiscardAll));
        }
    }

    fn unpin(&mut self) {
        self.unpin_requested = false;
        if self.pinned.take().is_some() {
            self.pool.stats().pinned.dec();
        }
    }

    fn refuse_extended(&mut self, report: ErrorReport) {
        self.skipping = true;
        let mut b = BytesMut::new();
        report.encode(&mut b);
        if self.queue.is_empty() {
            self.obuf.extend_from_slice(&b);
        } else {
            self.queue.push_back(Item::Synthetic(b.freeze()));
        }
    }

    /// `link`, except that a request no server connection can be found for (the server is
    /// down, the pool busy, no replica usable) fails alone: the client is told, as PostgreSQL
    /// would tell it of a failed statement, and may try again. False when refused so.
    async fn link_or_refuse(&mut self, tag: u8) -> Result<bool, TxEnd> {
        let refusal = match self.deferred_error.take() {
            Some(report) => Err(*report),
            None => match self.link().await {
                Ok(()) => Ok(()),
                Err(TxEnd::Pool(e)) if e.is_transient() => {
                    tracing::warn!(tenant = %self.pool.tenant().id, error = %e, "request refused: no server connection");
                    let mut report = e.report();
                    report.severity = Severity::Error;
                    Err(report)
                }
                Err(e) => return Err(e),
            },
        };
        match refusal {
            Ok(()) => Ok(true),
            Err(report) => {
                self.pool.stats().error(report.code.as_bytes());
                if matches!(tag, b'Q' | b'F' | b'S') {
                    let mut b = BytesMut::new();
                    report.encode(&mut b);
                    ready_for_query(&mut b, self.tx_status);
                    self.queue.push_back(Item::Synthetic(b.freeze()));
                } else {
                    self.refuse_extended(report);
                }
                Ok(false)
            }
        }
    }

    /// A backend for a read: from a usable replica (round robin; one that fails to connect
    /// is passed over at once), else from the primary if the session allows it.
    async fn checkout_read(&mut self) -> Result<Box<PooledBackend>, PoolError> {
        let mut last = None;
        if let Some(replicas) = self.pool.replicas().cloned() {
            for p in replicas.candidates() {
                let p = p.clone();
                match p.checkout_with(Patience::FailFast).await {
                    Ok(be) => {
                        self.serving = Some(p);
                        return Ok(be);
                    }
                    Err(e) => {
                        tracing::warn!(tenant = %self.pool.tenant().id, replica = %p.health().name, error = %e, "replica unavailable for a read");
                        last = Some(e);
                    }
                }
            }
        }
        let last = last.as_ref().map(|e| e as &dyn std::fmt::Display);
        if let Some(e) = self.reads.refuse_primary(&self.pool.tenant().id, last) {
            return Err(e);
        }
        self.pool.checkout().await
    }

    /// A backend from the tenant's current pool: a replica's for a read, else the primary's.
    async fn checkout_any(&mut self, read: bool) -> Result<Box<PooledBackend>, TxEnd> {
        loop {
            if self.pool.is_retired() {
                // The tenant's entry changed: continue on the pool built from it.
                self.pool = self.pool.current().ok_or_else(|| {
                    TxEnd::Pool(PoolError::Removed(self.pool.tenant().id.clone()))
                })?;
            }
            let checkout = if read {
                self.checkout_read().await
            } else {
                self.pool.checkout().await
            };
            match checkout {
                Err(PoolError::Retired) => continue,
                other => return other.map_err(TxEnd::Pool),
            }
        }
    }

    /// Counts the transaction the linked backend served, as it is let go.
    fn note_release(&mut self) {
        self.count_transaction();
        if self.linked_at.take().is_some() {
            self.pool.stats().active.dec();
        }
    }

    /// Counts the transaction that just ended (or the open one, on release).
    fn count_transaction(&mut self) {
        if let Some(at) = self.tx_began.take() {
            let took = at.elapsed();
            if self.slow.is_some_and(|s| took > s) {
                tracing::warn!(
                    tenant = %self.pool.tenant().id,
                    duration_ms = took.as_millis() as u64,
                    bytes_in = self.bytes_in - self.counted.0,
                    bytes_out = self.bytes_out - self.counted.1,
                    "slow transaction"
                );
            }
            let stats = self.pool.stats();
            stats.transaction(
                took.as_secs_f64(),
                self.bytes_in - self.counted.0,
                self.bytes_out - self.counted.1,
            );
            self.counted = (self.bytes_in, self.bytes_out);
        }
    }

    /// Borrows a backend for the transaction that is starting, and brings it in line with the
    /// client's session (settings); statements are prepared as they are used.
    async fn link(&mut self) -> Result<(), TxEnd> {
        if self.backend.is_some() {
            return Ok(());
        }
        let read = self.reads.all_reads || std::mem::take(&mut self.read_hint);
        let waited = std::time::Instant::now();
        // The counters are per (tenant, role), the same whichever pool serves it.
        self.pool.stats().waiting.inc();
        // A client that has to wait for a connection (a busy pool, a full server budget) holds
        // no empty buffers meanwhile: thousands may wait at once.
        let mut out = std::mem::take(&mut self.out);
        let mut obuf = std::mem::take(&mut self.obuf);
        let got = {
            let mut checkout = std::pin::pin!(self.checkout_any(read));
            match futures_util::poll!(checkout.as_mut()) {
                std::task::Poll::Ready(r) => r,
                std::task::Poll::Pending => {
                    if out.is_empty() {
                        buffers::give(&mut out);
                    }
                    if obuf.is_empty() {
                        buffers::give(&mut obuf);
                    }
                    checkout.await
                }
            }
        };
        self.out = if out.capacity() == 0 {
            buffers::take()
        } else {
            out
        };
        self.obuf = if obuf.capacity() == 0 {
            buffers::take()
        } else {
            obuf
        };
        let stats = self.pool.stats();
        stats.waiting.dec();
        let mut be = got?;
        let now = std::time::Instant::now();
        stats.wait_seconds.observe((now - waited).as_secs_f64());
        stats.active.inc();
        self.linked_at = Some(now);
        self.tx_began = Some(now);
        let (out_len, queue_len) = (self.out.len(), self.queue.len());
        let tenant = self.pool.tenant();
        let plan = super::prelude::prelude(
            self.pool.row().map(|r| &*r.tenant),
            be.bound_tenant(),
            &self.state,
            &be.applied_settings,
            tenant.enforce_limits.is_some(),
        );
        // Pipelined ahead of the client's messages, responses swallowed.
        if plan.reset {
            // Nothing of the previous tenant's session may remain (settings, also those made
            // with set_config(); cursors, locks, LISTEN, prepared statements, the context):
            // the reset leaves the session bound to no tenant, so if `bind` then fails the
            // client's statements see no rows, never another tenant's.
            be.prepared.clear();
            be.bound = None;
            put_query(&mut self.out, row_context::SWITCH_RESET_SQL);
            self.queue.push_back(Item::Proxy(Resp::Query));
        }
        if let Some(sql) = &plan.settings {
            // In a query of its own: one that fails must not roll the reset back.
            put_query(&mut self.out, sql);
            self.queue.push_back(Item::Proxy(Resp::Query));
        }
        if plan.reset || plan.settings.is_some() {
            be.applied_settings = self.state.script().clone();
        }
        if let (true, Some(row)) = (plan.bind, self.pool.row()) {
            if let Err(e) = be.put_row_bind(&mut self.out, &row.tenant) {
                self.out.truncate(out_len);
                self.queue.truncate(queue_len);
                self.pool.discard(be);
                return Err(TxEnd::Pool(PoolError::Backend(e)));
            }
            for r in [
                Resp::Parse(None),
                Resp::Bind,
                Resp::Enter(row.tenant.clone()),
                Resp::Sync,
            ] {
                self.queue.push_back(Item::Proxy(r));
            }
        }
        if let (true, Some(sql)) = (plan.caps, &tenant.enforce_limits) {
            // Whatever the last transaction raised, also through set_config().
            put_query(&mut self.out, sql);
            self.queue.push_back(Item::Proxy(Resp::Query));
        }
        if std::mem::take(&mut self.aborted_block) {
            put_query(&mut self.out, &abort_statement());
            self.queue.push_back(Item::Proxy(Resp::Abort));
        }
        self.cancel.link(be.cancel_target().clone());
        self.tx_status = be.tx_status();
        self.backend = Some(be);
        Ok(())
    }

    /// The linked server connection died (killed, server restarted or gone) with the client's
    /// requests in flight. Every request still waiting for its ReadyForQuery fails with the
    /// server's reason (or 08006); a transaction block the client had open stays open but
    /// aborted, as PostgreSQL leaves a failed one, so its later statements cannot run outside
    /// it. The next transaction gets a fresh connection.
    async fn recover_from_lost_server(&mut self, client: &mut ClientStream) -> Result<(), ()> {
        if let Some(mut be) = self.backend.take() {
            self.cancel.unlink();
            self.note_release();
            be.mark_broken();
            let pool = self.serving.take().unwrap_or_else(|| self.pool.clone());
            tracing::warn!(tenant = %self.pool.tenant().id, server = %be.server().name, "server connection lost mid-request; the client was told and keeps its connection");
            pool.health().wake_checker();
            pool.discard(be);
        }
        let report = self.server_fatal.take().map(|r| *r).unwrap_or_else(|| {
            ErrorReport::error(
                sqlstate::CONNECTION_FAILURE,
                "server connection lost: the server closed the connection unexpectedly",
            )
        });
        let report = report.with_detail(
            "pgtenant lost its connection to the server while this request ran; the client connection is still usable",
        ).with_hint("anything not confirmed committed was not, or may not have been: retry it");
        let in_block = self.tx_status != b'I' || self.began_in_batch;
        let status = if in_block { b'E' } else { b'I' };
        let waiting = self.unsynced || self.queue.iter().any(|i| matches!(i, Item::Client(_)));
        // After whatever of the server's output was already forwarded.
        let b = &mut self.obuf;
        if waiting {
            let mut answered = false;
            for item in self.queue.drain(..) {
                if let Item::Client(r) = item {
                    if r.ends_with_ready() {
                        report.encode(b);
                        ready_for_query(b, status);
                        answered = true;
                    }
                }
            }
            // Messages of an unfinished batch: one error, the rest dropped up to the Sync.
            if self.unsynced || !answered {
                report.encode(b);
                self.skipping = true;
            }
        } else {
            // Idle in its transaction: told with its next request (an ErrorResponse now would
            // answer nothing it asked).
            self.queue.clear();
            self.deferred_error = Some(Box::new(report));
        }
        self.out.clear();
        self.unsynced = false;
        self.copy = false;
        self.pending_ops.clear();
        self.unseen_changes = false;
        self.tx_failed = false;
        self.read_hint = false;
        self.began_in_batch = false;
        self.srv_forward = true;
        self.srv_last_tag = 0;
        self.tx_status = status;
        self.aborted_block = in_block;
        if send_all(client, &self.obuf).await.is_err() {
            return Err(());
        }
        self.bytes_out += self.obuf.len() as u64;
        self.obuf.clear();
        Ok(())
    }

    fn on_server_bytes(&mut self) -> Result<(), TxEnd> {
        let Some(mut be) = self.backend.take() else {
            return Ok(());
        };
        let result = self.scan_server(&mut be);
        self.backend = Some(be);
        result
    }

    /// Walks the server's output message by message. Forwarded bytes are copied to the client
    /// buffer in runs (one copy for a whole batch of rows), interrupted only by a swallowed
    /// message or by responses pgtenant answers itself.
    fn scan_server(&mut self, be: &mut PooledBackend) -> Result<(), TxEnd> {
        let mut pos = 0;
        // Forwarded bytes [run, pos) not yet copied.
        let mut run = 0;
        let buf_len = be.read_buf.len();
        if self.srv_remaining > 0 {
            let n = self.srv_remaining.min(buf_len);
            if !self.srv_forward {
                run = n;
            }
            pos = n;
            self.srv_remaining -= n;
            if self.srv_remaining == 0 && self.synthetic_next() {
                self.obuf.extend_from_slice(&be.read_buf[run..pos]);
                run = pos;
                self.emit_synthetics();
            }
        }
        while self.srv_remaining == 0 {
            let rest = &be.read_buf[pos..];
            if rest.len() < HEADER_LEN {
                break;
            }
            let tag = rest[0];
            let len = u32::from_be_bytes([rest[1], rest[2], rest[3], rest[4]]) as usize;
            if len < 4 || len - 4 > MAX_SERVER_MESSAGE {
                be.mark_broken();
                return Err(TxEnd::ServerGone);
            }
            let body_len = len - 4;
            let inspect = matches!(tag, b'Z' | b'C' | b'S' | b'E') && body_len <= INSPECT_LIMIT;
            if inspect && rest.len() < HEADER_LEN + body_len {
                be.read_buf.reserve(HEADER_LEN + body_len);
                break;
            }
            let forward = if tag == b'D' {
                // Rows: nothing to inspect, and they are most of what a server sends.
                !matches!(self.queue.front(), Some(Item::Proxy(_)))
            } else {
                // Copied out of the read buffer (which on_server_message may not borrow) into
                // a stack buffer: ReadyForQuery and CommandComplete arrive every transaction.
                let mut small = [0u8; 128];
                let mut large = Vec::new();
                let body: Option<&[u8]> = if !inspect {
                    None
                } else if body_len <= small.len() {
                    small[..body_len].copy_from_slice(&rest[HEADER_LEN..HEADER_LEN + body_len]);
                    Some(&small[..body_len])
                } else {
                    large.extend_from_slice(&rest[HEADER_LEN..HEADER_LEN + body_len]);
                    Some(&large)
                };
                self.on_server_message(be, tag, body)
            };
            let avail = (be.read_buf.len() - pos - HEADER_LEN).min(body_len);
            if !forward {
                self.obuf.extend_from_slice(&be.read_buf[run..pos]);
                run = pos + HEADER_LEN + avail;
            }
            self.srv_forward = forward;
            self.srv_last_tag = tag;
            pos += HEADER_LEN + avail;
            self.srv_remaining = body_len - avail;
            if self.srv_remaining == 0 && self.synthetic_next() {
                self.obuf.extend_from_slice(&be.read_buf[run..pos]);
                run = pos;
                self.emit_synthetics();
            }
        }
        if run < pos {
            self.obuf.extend_from_slice(&be.read_buf[run..pos]);
        }
        be.read_buf.advance(pos);
        Ok(())
    }

    /// Whether the next response in order is one pgtenant emits itself.
    fn synthetic_next(&self) -> bool {
        matches!(self.queue.front(), Some(Item::Synthetic(_) | Item::CopyEnd))
    }

    /// Updates the expected-response queue for one server message; true if it goes to the client.
    fn on_server_message(&mut self, be: &mut PooledBackend, tag: u8, body: Option<&[u8]>) -> bool {
        if tag == b'E' {
            if let Some(report) = body.and_then(fatal_report) {
                // The server is closing this connection; the client is told when it does, as
                // an ERROR, for its own connection stays.
                be.mark_broken();
                self.server_fatal = Some(Box::new(report));
                return false;
            }
        }
        let (proxy, resp) = match self.queue.front() {
            Some(Item::Client(r)) => (false, r.clone()),
            Some(Item::Proxy(r)) => (true, r.clone()),
            // Nothing expected: a notice or a FATAL on its way out; pass it on.
            _ => return true,
        };
        match tag {
            b'N' | b'A' => return !proxy,
            b'S' => {
                if let Some((k, rest)) = body.and_then(cstr) {
                    if let Some((v, _)) = cstr(rest) {
                        be.set_param(
                            String::from_utf8_lossy(k).into_owned(),
                            String::from_utf8_lossy(v).into_owned(),
                        );
                    }
                }
                return !proxy;
            }
            b'E' => {
                if proxy && matches!(resp, Resp::Abort) {
                    // Failed on purpose.
                    return false;
                }
                if proxy && matches!(resp, Resp::Query) {
                    tracing::warn!("replaying client settings failed on a server connection");
                    be.applied_settings = Arc::from("\0failed");
                    return false;
                }
                if !proxy {
                    self.tx_failed = true;
                    if let Some(code) = body.and_then(crate::protocol::report::sqlstate_of) {
                        self.pool.stats().error(code);
                    }
                }
                // The binding's own messages: the connection stays bound to nobody, and the
                // client, which did not send them, is not told (its statements fail closed).
                let binding =
                    proxy && matches!(resp, Resp::Parse(None) | Resp::Bind | Resp::Enter(_));
                if binding {
                    tracing::warn!("row-tier binding of a server connection failed");
                }
                if !resp.ends_with_ready() {
                    self.queue.pop_front();
                    self.forget_failed(be, &resp);
                    // The server skips everything up to the next Sync.
                    while let Some(item) = self.queue.front() {
                        match item {
                            Item::Client(Resp::Sync) | Item::Proxy(Resp::Sync) => break,
                            Item::Client(r) | Item::Proxy(r) => {
                                let r = r.clone();
                                self.forget_failed(be, &r);
                                self.queue.pop_front();
                            }
                            Item::Synthetic(_) | Item::CopyEnd => {
                                self.queue.pop_front();
                            }
                        }
                    }
                }
                // An error from an injected Parse stands for the client's message it served.
                return !binding;
            }
            b'Z' => {
                let status = body.and_then(|b| b.first().copied()).unwrap_or(b'I');
                be.tx_status = status;
                self.queue.pop_front();
                self.copy = false;
                if !proxy {
                    if let Some(at) = self.request_at.take() {
                        self.pool
                            .stats()
                            .query_seconds
                            .observe(at.elapsed().as_secs_f64());
                        let more = self
                            .queue
                            .iter()
                            .any(|i| matches!(i, Item::Client(r) if r.ends_with_ready()));
                        if more {
                            self.request_at = Some(std::time::Instant::now());
                        }
                    }
                    self.tx_status = status;
                    self.began_in_batch = false;
                    if status == b'I' {
                        // A transaction ended while the link goes on (more requests pipelined
                        // behind it, or a pinned client): counted now, one by one.
                        let more = self.queue.iter().any(|i| matches!(i, Item::Client(_)));
                        if more || self.pinned.is_some() {
                            self.count_transaction();
                            if more {
                                self.tx_began = Some(std::time::Instant::now());
                            }
                        }
                        let mut ops = std::mem::take(&mut self.pending_ops);
                        if !self.tx_failed && !ops.is_empty() {
                            // The tier's own setting is the tenant's, not the client's: a change
                            // lasts to the end of its transaction, and the connection gets the
                            // pinned value back (RESET ALL) before it serves another one.
                            let pinned = pinned_setting(self.pool.tenant().tier);
                            if self.pool.row().is_some() && ops.iter().any(clears_row_context) {
                                // Reset and entered anew before the next transaction.
                                be.bound = None;
                            }
                            let n = ops.len();
                            ops.retain(|op| !matches!(op, SettingOp::Set { name, .. } if Some(name.as_str()) == pinned));
                            let changed_pin = ops.len() < n;
                            self.state.apply(ops);
                            be.applied_settings = if changed_pin {
                                Arc::from(PIN_CHANGED)
                            } else {
                                self.state.script().clone()
                            };
                        }
                        if std::mem::take(&mut self.unseen_changes) {
                            be.applied_settings = Arc::from(PIN_CHANGED);
                        }
                        self.tx_failed = false;
                        if self.unpin_requested && self.queue.is_empty() {
                            tracing::info!(tenant = %self.pool.tenant().id, "client unpinned by DISCARD ALL");
                            self.unpin();
                        }
                    }
                }
                return !proxy;
            }
            b'1' | b'2' | b'3' => {
                self.queue.pop_front();
                if let Resp::Parse(Some(name)) = &resp {
                    self.pool.mark_parsed(name);
                }
                if let (Resp::Close(Some(name)), true) = (&resp, proxy) {
                    be.prepared.remove(name);
                }
            }
            b'n' | b'T' if matches!(resp, Resp::DescribeStatement | Resp::DescribePortal) => {
                self.queue.pop_front();
            }
            b'C' | b'I' | b's' => {
                if let Some(text) = body.and_then(cstr).map(|(t, _)| t) {
                    match text {
                        // pgtenant's own (a row tenant switch) was accounted for when sent.
                        b"DISCARD ALL" if !proxy => {
                            be.bound = None;
                            be.prepared.clear();
                            self.state.statements.clear();
                            be.applied_settings = Arc::from("");
                        }
                        b"DEALLOCATE ALL" if !proxy => {
                            be.prepared.clear();
                            self.state.statements.clear();
                        }
                        b"ROLLBACK" if !proxy => self.tx_failed = true,
                        b"BEGIN" | b"START TRANSACTION" if !proxy => self.began_in_batch = true,
                        // A DISCARD of the client's cleared the row context: enter again before
                        // the next transaction.
                        t if !proxy && t.starts_with(b"DISCARD") && self.pool.row().is_some() => {
                            be.bound = None;
                        }
                        _ => {}
                    }
                }
                match &resp {
                    Resp::Execute => {
                        self.queue.pop_front();
                    }
                    Resp::Enter(tenant) => {
                        self.queue.pop_front();
                        let accepted = body.and_then(cstr).map(|(t, _)| t)
                            == Some(row_context::ACCEPTED_TAG.as_bytes());
                        if accepted {
                            be.bound = Some(tenant.clone());
                        } else {
                            // The client's statements ran bound to no one; this connection
                            // is not to be trusted with another.
                            tracing::error!(tenant = %tenant, "server refused the row-tier binding of a connection; closing it");
                            be.broken = true;
                        }
                    }
                    _ => {}
                }
            }
            b'G' => {
                // Syncs the client pipelined after the COPY's Execute, up to where it ended the
                // copy, reach the server during copy-in and are ignored: expect nothing of them.
                self.copy = true;
                let mut i = 1;
                while i < self.queue.len() {
                    match self.queue[i] {
                        Item::Client(Resp::Sync) => {
                            self.queue.remove(i);
                        }
                        Item::CopyEnd => {
                            self.queue.remove(i);
                            self.copy = false;
                            break;
                        }
                        _ => i += 1,
                    }
                }
            }
            _ => {}
        }
        !proxy
    }

    /// A Parse that failed or was skipped never prepared its statement.
    fn forget_failed(&mut self, be: &mut PooledBackend, resp: &Resp) {
        if let Resp::Parse(Some(name)) = resp {
            be.prepared.remove(name);
        }
    }
}

impl TxOutcome {
    /// Tells the client why its session ended, when it can still be told.
    async fn report_to(
        self,
        client: &mut ClientStream,
        at_boundary: bool,
        last_server_tag: u8,
    ) -> TxOutcome {
        let report = match &self.end {
            TxEnd::ClientError(e) => e.report(),
            TxEnd::Timeout(r) => Some(r.clone()),
            TxEnd::Pool(e) => Some(e.report()),
            TxEnd::Shutdown => Some(ErrorReport::fatal(
                sqlstate::ADMIN_SHUTDOWN,
                "terminating connection: pgtenant is shutting down",
            )),
            TxEnd::ServerGone if last_server_tag != b'E' => Some(ErrorReport::fatal(
                sqlstate::CONNECTION_FAILURE,
                "server closed the connection unexpectedly",
            )),
            _ => None,
        };
        if let (Some(r), true) = (report, at_boundary) {
            let mut b = BytesMut::new();
            r.encode(&mut b);
            let _ = client.write_all(&b).await;
        }
        self
    }
}

/// Writes all of `buf`: one direct send in the usual case (the socket has room), tokio's
/// `write_all` future only when it does not.
async fn send_all<S: TryWrite + AsyncWriteExt + Unpin>(
    stream: &mut S,
    buf: &[u8],
) -> std::io::Result<()> {
    match stream.try_write(buf) {
        Ok(n) if n == buf.len() => Ok(()),
        Ok(n) => stream.write_all(&buf[n..]).await,
        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => stream.write_all(buf).await,
        Err(e) => Err(e),
    }
}

/// Waits until the idle client sends something and returns it, holding only a small probe
/// while waiting (an idle client must not pin a full buffer). The read goes through
/// `AsyncRead::read`, after which tokio clears its readiness flag on a short read; that saves a
/// wasted EAGAIN read per transaction.
async fn wait_for_input(client: &mut ClientStream) -> Result<BytesMut, ()> {
    // The probe lives only inside a poll, not in the waiting future: an idle client's task
    // holds a few pointers here, not a buffer.
    std::future::poll_fn(|cx| {
        let mut probe = [0u8; 256];
        let mut rb = tokio::io::ReadBuf::new(&mut probe);
        match tokio::io::AsyncRead::poll_read(std::pin::Pin::new(&mut *client), cx, &mut rb) {
            std::task::Poll::Pending => std::task::Poll::Pending,
            std::task::Poll::Ready(Err(_)) => std::task::Poll::Ready(Err(())),
            std::task::Poll::Ready(Ok(())) if rb.filled().is_empty() => {
                std::task::Poll::Ready(Err(()))
            }
            std::task::Poll::Ready(Ok(())) => {
                let mut buf = buffers::take();
                buf.extend_from_slice(rb.filled());
                std::task::Poll::Ready(Ok(buf))
            }
        }
    })
    .await
}

/// Setting changes a query makes, and the first thing in it transaction pooling cannot serve.
fn inspect_sql(text: &[u8]) -> (Vec<SettingOp>, Option<&'static str>) {
    let mut ops = Vec::new();
    if !may_matter(text) {
        return (ops, None);
    }
    let text = String::from_utf8_lossy(text);
    let text: &str = &text;
    for stmt in statements(text) {
        match classify(stmt) {
            Statement::Unsupported(what) => return (ops, Some(what)),
            Statement::Set { name, text } => ops.push(SettingOp::Set {
                name,
                statement: text.to_string(),
            }),
            Statement::Reset(Some(name)) => ops.push(SettingOp::Reset(name)),
            Statement::Reset(None) | Statement::DiscardAll => ops.push(SettingOp::ResetAll),
            Statement::DeallocateAll | Statement::Other => {}
        }
    }
    (ops, None)
}

/// The setting a tier pins on every session, which clients may change only for a transaction.
fn pinned_setting(tier: Tier) -> Option<&'static str> {
    tier.rules().pinned_setting
}

/// Whether a client's setting change cleared (or tampered with) its row-tier context.
fn clears_row_context(op: &SettingOp) -> bool {
    match op {
        SettingOp::ResetAll => true,
        SettingOp::Set { name, .. } | SettingOp::Reset(name) => {
            row_context::is_reserved_setting(name)
        }
    }
}

fn refusal_report(what: &str) -> ErrorReport {
    ErrorReport::error(
        sqlstate::FEATURE_NOT_SUPPORTED,
        format!("{what} cannot be used in transaction pooling mode"),
    )
    .with_hint("use pool_mode = \"session\" for this tenant, or avoid session-level state")
}

/// A statement that fails with `report`'s SQLSTATE, message and hint on the server, so the
/// refusal aborts the client's transaction exactly like a server-side error would.
fn raise_statement(report: &ErrorReport) -> String {
    let lit = |s: &str| s.replace('\'', "''").replace('$', "");
    format!(
        "DO $pgtenant$BEGIN RAISE EXCEPTION USING ERRCODE = '{}', MESSAGE = '{}', HINT = '{}'; END$pgtenant$",
        report.code,
        lit(&report.message),
        lit(report.hint.as_deref().unwrap_or(""))
    )
}

/// Opens a transaction and fails it: what a client whose transaction was lost with its server
/// connection finds its next statements in (see `Resp::Abort`).
fn abort_statement() -> String {
    let report = ErrorReport::error(
        sqlstate::IN_FAILED_TRANSACTION,
        "the transaction was aborted when its server connection was lost",
    );
    format!("BEGIN; {}", raise_statement(&report))
}

/// The error a server sends before closing a connection (FATAL or PANIC), as a report of
/// ERROR severity with the server's code and message.
fn fatal_report(body: &[u8]) -> Option<ErrorReport> {
    let (mut severity, mut code, mut message) = (None, None, None);
    for (field, value) in crate::protocol::report::error_fields(body) {
        match field {
            b'V' => severity = Some(value),
            b'S' if severity.is_none() => severity = Some(value),
            b'C' => code = Some(value),
            b'M' => message = Some(value),
            _ => {}
        }
    }
    if !matches!(severity?, b"FATAL" | b"PANIC") {
        return None;
    }
    let code = match code.unwrap_or_default() {
        b"57P01" => sqlstate::ADMIN_SHUTDOWN,
        b"57P02" => "57P02",
        b"57P03" => sqlstate::CANNOT_CONNECT_NOW,
        b"57P05" => "57P05",
        b"25P03" => "25P03",
        _ => sqlstate::CONNECTION_FAILURE,
    };
    let message = String::from_utf8_lossy(message.unwrap_or(b"server closed the connection"));
    Some(ErrorReport::error(code, message.into_owned()))
}

fn malformed(tag: u8) -> TxEnd {
    TxEnd::ClientError(SessionError::Malformed(tag))
}

fn ready_for_query(buf: &mut BytesMut, status: u8) {
    buf.put_u8(b'Z');
    buf.put_u32(5);
    buf.put_u8(status);
}

fn put_query(buf: &mut BytesMut, sql: &str) {
    put_message(buf, b'Q', &[sql.as_bytes(), b"\0"]);
}

fn put_message(buf: &mut BytesMut, tag: u8, parts: &[&[u8]]) {
    let len: usize = parts.iter().map(|p| p.len()).sum::<usize>() + 4;
    buf.put_u8(tag);
    buf.put_u32(len as u32);
    for p in parts {
        buf.put_slice(p);
    }
}

fn build_message(tag: u8, parts: &[&[u8]]) -> Bytes {
    let mut b = BytesMut::new();
    put_message(&mut b, tag, parts);
    b.freeze()
}
