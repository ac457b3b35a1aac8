//! LISTEN in transaction mode without a server connection (database tier): the client's
//! LISTEN and UNLISTEN are answered here and held by the tenant database's hub
//! (`pool::listen_hub`); what the hub hands over is delivered while the client is idle, as a
//! direct connection delivers notifications between transactions.

use bytes::{Bytes, BytesMut};

use super::{put_message, ready_for_query, Engine, TxEnd};
use crate::clients::stream::ClientStream;
use crate::frontend::client_state::SettingOp;
use crate::frontend::sql_policy::{classify, listen_request, statements, ListenRequest, Statement};
use crate::pool::listen_hub::Listener;
use crate::protocol::framing::cstr;
use crate::protocol::{sqlstate, ErrorReport};

/// A client's LISTENs held by the hub, and an extended-protocol LISTEN being answered.
pub(super) struct Listening {
    hub: Listener,
    /// An extended-protocol LISTEN, answered message by message until its Sync.
    pending: Option<Pending>,
}

pub(super) enum Pending {
    /// Parsed as the unnamed statement, which lasts past a Sync (tokio-postgres describes it
    /// and syncs before binding) until another Parse or Query replaces it.
    Parsed {
        request: ListenRequest,
        synced: bool,
    },
    /// Executed: only its Sync may follow.
    Executed,
}

impl Listening {
    pub(super) fn mailbox(&self) -> &std::sync::Arc<crate::pool::listen_hub::Mailbox> {
        self.hub.mailbox()
    }
}

impl Engine {
    /// Whether a LISTEN could be answered here now: a tenant that may hear notifications, no
    /// server connection, no transaction open.
    fn may_listen_locally(&self) -> bool {
        self.pool.tenant().tier.rules().notifications
            && self.backend.is_none()
            && !self.pinned
            && self.tx_status == b'I'
            && !self.pipe.awaits_server()
    }

    /// A query that is one LISTEN or UNLISTEN, from a client with no server connection and no
    /// transaction open, of a tenant that may hear notifications: answered here. Anything
    /// else (inside a transaction block, with other statements, from dynamic SQL) goes to the
    /// server as before, where a LISTEN pins the client or is refused.
    pub(super) async fn listened_locally(&mut self, text: &[u8]) -> bool {
        let Some(request) = self.local_listen_request(text) else {
            return false;
        };
        let mut b = self.answer_listen(request).await;
        ready_for_query(&mut b, self.tx_status);
        self.pipe.synthesize(b.freeze());
        self.request_at = None;
        true
    }

    /// `text` as a LISTEN or UNLISTEN this engine answers itself, when it may.
    fn local_listen_request(&self, text: &[u8]) -> Option<ListenRequest> {
        let head = text.trim_ascii_start();
        let starts = |k: &[u8]| {
            head.get(..k.len())
                .is_some_and(|h| h.eq_ignore_ascii_case(k))
        };
        if !(starts(b"LISTEN") || starts(b"UNLISTEN")) || !self.may_listen_locally() {
            return None;
        }
        std::str::from_utf8(text).ok().and_then(listen_request)
    }

    /// Carries out `request` and returns its CommandComplete, or the ErrorResponse.
    async fn answer_listen(&mut self, request: ListenRequest) -> BytesMut {
        let mut b = BytesMut::with_capacity(32);
        match request {
            ListenRequest::Listen(channel) => {
                let l = self.listening_slot();
                match l.hub.listen(&channel).await {
                    Ok(()) => put_message(&mut b, b'C', &[b"LISTEN\0"]),
                    Err(report) => report.encode(&mut b),
                }
            }
            ListenRequest::Unlisten(channel) => {
                if let Some(l) = self.listening.as_mut() {
                    l.hub.unlisten(channel.as_deref());
                }
                put_message(&mut b, b'C', &[b"UNLISTEN\0"]);
            }
        }
        if self
            .listening
            .as_ref()
            .is_some_and(|l| !l.hub.is_listening() && l.pending.is_none())
        {
            self.listening = None;
        }
        b
    }

    fn listening_slot(&mut self) -> &mut Listening {
        let pool = &self.pool;
        self.listening.get_or_insert_with(|| {
            Box::new(Listening {
                hub: pool
                    .listen_hubs()
                    .subscriber(&pool.tenant().id, pool.spec()),
                pending: None,
            })
        })
    }

    /// Parse of one LISTEN or UNLISTEN as the unnamed statement (how psycopg and JDBC send
    /// every statement): answered here, and so are its Bind, Describe, Execute and Sync.
    pub(super) fn parsed_listen_locally(&mut self, name: &[u8], query: &[u8]) -> bool {
        if !name.is_empty() {
            return false;
        }
        let Some(request) = self.local_listen_request(query) else {
            return false;
        };
        self.listening_slot().pending = Some(Pending::Parsed {
            request,
            synced: false,
        });
        self.pipe
            .synthesize(Bytes::from_static(super::PARSE_COMPLETE));
        true
    }

    /// Whether an extended-protocol LISTEN is being answered (`parsed_listen_locally`).
    pub(super) fn listen_pending(&self) -> bool {
        self.listening.as_ref().is_some_and(|l| l.pending.is_some())
    }

    /// The messages after an extended-protocol LISTEN's Parse: its Bind, Describe, Execute,
    /// Flush and Sync are answered here (true). Once synced, any other message replaces the
    /// statement and is served as usual (false); before, it fails the LISTEN, which has to be
    /// sent alone.
    pub(super) async fn on_pending_listen(&mut self, tag: u8, body: &[u8]) -> bool {
        let Some(pending) = self.listening.as_mut().and_then(|l| l.pending.as_mut()) else {
            return false;
        };
        let unnamed = |b: &[u8], skip: usize| b.get(skip) == Some(&0);
        match (tag, pending) {
            // Bind: portal name, then statement name; ours is the unnamed one.
            (b'B', Pending::Parsed { synced, .. })
                if cstr(body).is_some_and(|(_, rest)| rest.first() == Some(&0)) =>
            {
                *synced = false;
                self.pipe
                    .synthesize(Bytes::from_static(super::BIND_COMPLETE));
            }
            (b'D', Pending::Parsed { synced, .. }) if unnamed(body, 1) => {
                *synced = false;
                let answer = if body.first() == Some(&b'S') {
                    super::NO_PARAMETERS_NO_DATA
                } else {
                    super::NO_DATA
                };
                self.pipe.synthesize(Bytes::from_static(answer));
            }
            (b'E', p @ Pending::Parsed { .. }) if unnamed(body, 0) => {
                if let Pending::Parsed { request, .. } = std::mem::replace(p, Pending::Executed) {
                    let b = self.answer_listen(request).await;
                    self.skipping = b.first() == Some(&b'E');
                    self.pipe.synthesize(b.freeze());
                }
            }
            (b'H', _) => {}
            (b'S', p) => {
                match p {
                    Pending::Parsed { synced, .. } => *synced = true,
                    Pending::Executed => self.end_pending_listen(),
                }
                self.skipping = false;
                let mut b = BytesMut::with_capacity(6);
                ready_for_query(&mut b, self.tx_status);
                self.pipe.synthesize(b.freeze());
                self.request_at = None;
            }
            (_, Pending::Parsed { synced: true, .. }) => {
                self.end_pending_listen();
                return false;
            }
            _ => {
                let mut b = BytesMut::new();
                ErrorReport::error(
                    sqlstate::FEATURE_NOT_SUPPORTED,
                    "LISTEN cannot be used in transaction pooling mode with other statements before its Sync",
                )
                .encode(&mut b);
                self.pipe.synthesize(b.freeze());
                self.skipping = true;
            }
        }
        true
    }

    fn end_pending_listen(&mut self) {
        if let Some(l) = self.listening.as_mut() {
            l.pending = None;
            if !l.hub.is_listening() {
                self.listening = None;
            }
        }
    }

    /// DISCARD ALL ends every LISTEN, also those the hub holds.
    pub(super) fn note_discard_all(&mut self, ops: &[SettingOp], text: &[u8]) {
        if self.listening.is_none() || !ops.contains(&SettingOp::ResetAll) {
            return;
        }
        let text = String::from_utf8_lossy(text);
        if statements(&text)
            .into_iter()
            .any(|s| matches!(classify(s), Statement::DiscardAll))
        {
            self.listening = None;
        }
    }

    /// Writes the notifications waiting for this idle client. A subscription whose server
    /// connection was lost ends the session, as the loss of its own connection would end a
    /// direct one: the client reconnects and listens again, knowing it may have missed some.
    pub(super) async fn deliver_notifications(
        &mut self,
        client: &mut ClientStream,
    ) -> Result<(), TxEnd> {
        let Some(listening) = self.listening.as_ref() else {
            return Ok(());
        };
        let mut out = BytesMut::new();
        let lost = listening.hub.mailbox().drain_into(&mut out).is_err();
        if !out.is_empty() {
            if super::send_all(client, &out).await.is_err() {
                return Err(TxEnd::ClientGone);
            }
            self.bytes_out += out.len() as u64;
        }
        if lost {
            self.listening = None;
            return Err(TxEnd::Lost(ErrorReport::fatal(
                sqlstate::CONNECTION_FAILURE,
                "terminating connection: pgtenant's server connection holding this client's LISTEN was lost, so notifications may have been missed",
            )));
        }
        Ok(())
    }
}
