//! Transaction pooling: a client borrows a backend from its first message of a transaction to
//! the ReadyForQuery that ends it with status 'I'.
//!
//! Between transactions the client's session lives in `ClientState`: settings are replayed and
//! named statements re-prepared (under pool-wide names) on whichever backend serves the next
//! transaction, pipelined in front of the client's own messages, with the responses to what
//! pgtenant injected swallowed. Every message sent to the backend gets an entry in `pipeline`,
//! which matches each response to its request.
//!
//! Here: the engine's state and its loop (idle wait, active serving, flushing, release).
//! `requests`: each client message. `pipeline`: the expected responses, with no I/O.
//! `responses`: what the engine applies of them. `linking`: borrowing and preparing a backend.
//! `recovery`: a lost server connection.

use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::Duration;

use crate::clients::stream::ClientStream;
use bytes::{Buf, Bytes, BytesMut};
use futures_util::future::Either;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::sql_policy::{
    classify, deallocated_name, may_change_settings_unseen, may_matter,
    opens_read_only_transaction, statements, Statement,
};
use crate::backend::reset::Leftover;
use crate::backend::stream::TryWrite;
use crate::config::{SessionFeatures, Tier};
use crate::pool::{Liveness, Patience, PoolError, PooledBackend, ReadPolicy, TenantPool};
use crate::protocol::framing::{cstr, header, HEADER_LEN};
use crate::protocol::messages::{build_message, put_message, put_query, ready_for_query};
use crate::protocol::report::Severity;
use crate::protocol::{sqlstate, ErrorReport, Scanner};
use crate::tenancy::row_context;

use super::buffers;
use super::client_state::{ClientState, ClientStatement, SettingOp};
use super::error::SessionError;
use crate::clients::cancel::CancelGuard;

mod linking;
mod listening;
pub mod pipeline;
mod recovery;
mod requests;
mod responses;

use pipeline::{Item, Pipeline, Resp, INSPECT_LIMIT, MAX_SERVER_MESSAGE};

use requests::{clears_row_context, pinned_setting, raise_statement};

const READ_CHUNK: usize = 8192;
const PARSE_COMPLETE: &[u8] = b"1\0\0\0\x04";
const BIND_COMPLETE: &[u8] = b"2\0\0\0\x04";
const NO_DATA: &[u8] = b"n\0\0\0\x04";
/// ParameterDescription of a statement without parameters, then NoData.
const NO_PARAMETERS_NO_DATA: &[u8] = b"t\0\0\0\x06\0\0n\0\0\0\x04";
/// Applied-settings marker of a connection whose tier-pinned setting a client changed: equal to
/// no client's script, so the next transaction on it starts with RESET ALL.
const PIN_CHANGED: &str = "\0pin changed";
const CLOSE_COMPLETE: &[u8] = b"3\0\0\0\x04";

/// A session's limits, packed small: every idle client holds them.
#[derive(Debug, Clone, Copy)]
struct Limits {
    /// Transactions longer than this are logged.
    slow_ms: Option<NonZeroU32>,
    idle_tx_secs: Option<NonZeroU32>,
    max_message: u32,
    max_prepared: u32,
}

impl Limits {
    fn slow(&self) -> Option<Duration> {
        self.slow_ms
            .map(|ms| Duration::from_millis(ms.get().into()))
    }

    fn idle_tx_timeout(&self) -> Option<Duration> {
        self.idle_tx_secs
            .map(|s| Duration::from_secs(s.get().into()))
    }

    fn max_message(&self) -> usize {
        self.max_message as usize
    }

    fn max_prepared(&self) -> usize {
        self.max_prepared as usize
    }
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
    /// What the client's session stood on was lost (its LISTEN subscription); told as this.
    Lost(ErrorReport),
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
    /// The time of the bytes being handled (client or server), read once when first needed
    /// and forgotten when the next bytes come or a wait ends: one clock read stamps a
    /// request, its checkout and its transaction's start, another its end.
    batch_now: Option<std::time::Instant>,
    /// The linked backend counts as active in the pool's stats; when the transaction not yet
    /// counted began (None between transactions of a link that outlives them: pipelined or
    /// pinned); and the byte counts at the last counted transaction.
    active_counted: bool,
    tx_began: Option<std::time::Instant>,
    counted: (u64, u64),
    /// When the oldest client request still waiting for its ReadyForQuery was received.
    request_at: Option<std::time::Instant>,
    /// The first bytes of this turn came through a wake-up by this thread's reactor (the
    /// client was idle, and its new request is what woke it): the turn's first checkout may
    /// trust the reactor's view of parked connections (`Liveness::AfterWake`). Taken by
    /// that checkout; cleared once those bytes are handled.
    woken_for_request: bool,
    /// A session feature pinned this client to its server connection (`session_features =
    /// pin`; the log names which), and whether a DISCARD ALL asked to let it go.
    pinned: bool,
    unpin_requested: bool,
    /// Database tier: the client's LISTENs, held by the tenant database's hub
    /// (`pool::listen_hub`) rather than a server connection; None until its first LISTEN.
    listening: Option<Box<listening::Listening>>,
    state: ClientState,
    cancel: CancelGuard,
    limits: Limits,
    /// Boxed so an idle client's engine does not carry a connection-sized empty slot.
    backend: Option<Box<PooledBackend>>,
    /// What the linked server connection is expected to answer, in order.
    pipe: Pipeline,
    unsynced: bool,
    /// A refused extended-protocol message: drop the client's messages until Sync.
    skipping: bool,
    tx_status: u8,
    tx_failed: bool,
    pending_ops: Vec<SettingOp>,
    /// Schema tier: the transaction may have changed `search_path` where no parser sees it
    /// (`set_config()`, dynamic SQL); the pinned value is restored before the next one.
    unseen_changes: bool,
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
        let notifications = pool.tenant().tier.rules().notifications;
        Engine {
            pool,
            reads,
            read_hint: false,
            serving: None,
            server_fatal: None,
            aborted_block: false,
            began_in_batch: false,
            deferred_error: None,
            batch_now: None,
            active_counted: false,
            tx_began: None,
            counted: (0, 0),
            request_at: None,
            woken_for_request: false,
            pinned: false,
            unpin_requested: false,
            listening: None,
            state,
            cancel,
            limits: Limits {
                slow_ms: None,
                idle_tx_secs: NonZeroU32::new(idle_tx_timeout.min(u32::MAX as u64) as u32),
                max_message: max_message.min(u32::MAX as usize) as u32,
                max_prepared: max_prepared.clamp(1, u32::MAX as usize) as u32,
            },
            backend: None,
            pipe: Pipeline::new(notifications),
            unsynced: false,
            skipping: false,
            tx_status: b'I',
            tx_failed: false,
            pending_ops: Vec::new(),
            unseen_changes: false,
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
        self.limits.slow_ms = threshold
            .and_then(|d| NonZeroU32::new(d.as_millis().clamp(1, u32::MAX as u128) as u32));
        self
    }

    /// By reference: the engine lives in the session's state, not a second time in this
    /// future's. While the client idles this future holds four pointers: everything a
    /// transaction needs lives in one boxed future that exists only while it runs.
    pub async fn run(&mut self, client: &mut ClientStream) -> TxOutcome {
        let end = loop {
            // Between transactions a client holds no buffers and no transaction state on the
            // stack: thousands of idle clients then cost little more than their sockets.
            buffers::give(&mut self.out);
            buffers::give(&mut self.obuf);
            let mailbox = self.listening.as_deref().map(|l| l.mailbox());
            // A turn is boxed, and its input moved into it: nothing of it stays in an idle
            // client's task. Made before it is awaited, so that the idle wait's result is
            // gone by then. Kept under mimalloc's small-object size (1 KiB), which allocates
            // from a page's free list.
            let turn = match wait_for_input(client, &self.cancel, mailbox).await {
                Idle::Input(first, woken) => {
                    self.woken_for_request = woken;
                    Either::Left(Box::pin(self.transaction(client, first)))
                }
                Idle::Mail => Either::Right(Box::pin(self.deliver_notifications(client))),
                Idle::Gone => break TxEnd::ClientGone,
                Idle::Draining => break TxEnd::Shutdown,
            };
            if let Err(end) = turn.await {
                break end;
            }
        };
        Box::pin(self.finish(client, end)).await
    }

    /// One turn of activity, from the client's first bytes until it is idle again, with no
    /// backend and nothing buffered.
    async fn transaction(
        &mut self,
        client: &mut ClientStream,
        mut cbuf: BytesMut,
    ) -> Result<(), TxEnd> {
        if self.out.capacity() == 0 {
            self.out = buffers::take();
        }
        if self.obuf.capacity() == 0 {
            self.obuf = buffers::take();
        }
        let served = self.serve_active(client, &mut cbuf).await;
        buffers::give(&mut cbuf);
        match served {
            Ok(()) => Ok(()),
            // Lost at a message boundary: the client is told, and keeps its connection;
            // unless it was pinned, for then its session state went with the server
            // connection, and its session ends as a session-mode one would.
            Err(TxEnd::ServerGone) if self.pipe.mid_message() == 0 && !self.pinned => {
                match Box::pin(self.recover_from_lost_server(client)).await {
                    Ok(()) => Ok(()),
                    Err(_) => Err(TxEnd::ClientGone),
                }
            }
            Err(e) => Err(e),
        }
    }

    async fn serve_active(
        &mut self,
        client: &mut ClientStream,
        cbuf: &mut BytesMut,
    ) -> Result<(), TxEnd> {
        self.bytes_in += cbuf.len() as u64;
        let handled = self.on_client_bytes(cbuf).await;
        // Bytes read from here on may have come after the reactor last looked.
        self.woken_for_request = false;
        handled?;
        self.flush(client).await?;
        loop {
            if self.backend.is_none() && cbuf.is_empty() {
                return Ok(());
            }
            self.make_room(cbuf);
            let mut idle_timer = self.idle_in_transaction_timer();
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
                    self.batch_now = None;
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

    /// The time of the bytes being handled (`batch_now`).
    fn now(&mut self) -> std::time::Instant {
        *self.batch_now.get_or_insert_with(std::time::Instant::now)
    }

    /// Room for the next reads from the client and the server.
    fn make_room(&mut self, cbuf: &mut BytesMut) {
        if cbuf.capacity() - cbuf.len() < 1024 {
            cbuf.reserve(READ_CHUNK);
        }
        if let Some(be) = self.backend.as_mut() {
            if be.read_buf.capacity() - be.read_buf.len() < 1024 {
                be.read_buf.reserve(READ_CHUNK);
            }
        }
    }

    /// The idle-in-transaction limit's timer, when one is configured and a transaction is
    /// open. Boxed, and only then: an inline timer would enlarge (and over-align) the state
    /// every transaction allocates.
    fn idle_in_transaction_timer(&self) -> Option<std::pin::Pin<Box<tokio::time::Sleep>>> {
        let in_tx = self.backend.is_some() && self.tx_status != b'I';
        let limit = self.limits.idle_tx_timeout().filter(|_| in_tx)?;
        Some(Box::pin(tokio::time::sleep(limit)))
    }

    async fn finish(&mut self, client: &mut ClientStream, end: TxEnd) -> TxOutcome {
        self.batch_now = None;
        self.unpin();
        self.note_release();
        let backend = self.backend.take().map(|be| {
            let left = Leftover {
                pending: self.pipe.pending_ready(),
                unsynced: self.unsynced,
                copy_in: self.pipe.copy,
                scanner: Scanner::mid_message(
                    MAX_SERVER_MESSAGE,
                    INSPECT_LIMIT,
                    self.pipe.mid_message(),
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
        .report_to(client, self.pipe.mid_message() == 0, self.pipe.last_tag())
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
        self.pipe.emit_synthetics(&mut self.obuf);
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
        let done = !self.pinned && self.pipe.is_done() && self.tx_status == b'I' && !self.unsynced;
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
            TxEnd::Timeout(r) | TxEnd::Lost(r) => Some(r.clone()),
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

/// What ended an idle client's wait.
enum Idle {
    /// The client's first bytes; true when the wait was pending before them, so that they
    /// came through a wake-up by the reactor.
    Input(BytesMut, bool),
    Gone,
    Draining,
    /// Notifications for a listening client (or word that its subscription was lost).
    Mail,
}

/// Waits until the idle client sends something and returns it, until notifications wait for
/// it (a listening client), or until pgtenant starts shutting down. Hand-written rather than a
/// `select!` over the read and a `Notify`: this is the future every idle client's task holds,
/// and it is three references; the shutdown wake-up goes through the client's cancel
/// registration instead of a waiter node of its own.
///
/// The probe lives only inside a poll (an idle client must not pin a full buffer). The read
/// goes through `AsyncRead::poll_read`, after which tokio clears its readiness flag on a short
/// read; that saves a wasted EAGAIN read per transaction. The input comes with whether the
/// read was pending first (see `Engine::woken_for_request`).
///
/// A plain `poll_fn`, not an `async fn` around one, which would add a state machine around
/// it.
fn wait_for_input<'a>(
    client: &'a mut ClientStream,
    cancel: &'a CancelGuard,
    mailbox: Option<&'a Arc<crate::pool::listen_hub::Mailbox>>,
) -> impl std::future::Future<Output = Idle> + 'a {
    use std::task::Poll;
    let mut waited = false;
    std::future::poll_fn(move |cx| {
        if cancel.drain_wakes(cx.waker()) {
            return Poll::Ready(Idle::Draining);
        }
        if mailbox.is_some_and(|m| m.wakes(cx.waker())) {
            return Poll::Ready(Idle::Mail);
        }
        let mut probe = [0u8; 256];
        let mut rb = tokio::io::ReadBuf::new(&mut probe);
        match tokio::io::AsyncRead::poll_read(std::pin::Pin::new(&mut *client), cx, &mut rb) {
            Poll::Pending => {
                // Only a pending read with budget left means the socket had nothing: one with
                // the task's budget spent is woken again by the scheduler, not the reactor.
                waited = tokio::task::coop::has_budget_remaining();
                Poll::Pending
            }
            Poll::Ready(Err(_)) => Poll::Ready(Idle::Gone),
            Poll::Ready(Ok(())) if rb.filled().is_empty() => Poll::Ready(Idle::Gone),
            Poll::Ready(Ok(())) => {
                let mut buf = buffers::take();
                buf.extend_from_slice(rb.filled());
                Poll::Ready(Idle::Input(buf, waited))
            }
        }
    })
}

fn malformed(tag: u8) -> TxEnd {
    TxEnd::ClientError(SessionError::Malformed(tag))
}
