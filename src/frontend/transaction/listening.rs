//! LISTEN in transaction mode without a server connection (database tier): the client's
//! LISTEN and UNLISTEN are answered here and held by the tenant database's hub
//! (`pool::listen_hub`); what the hub hands over is delivered while the client is idle, as a
//! direct connection delivers notifications between transactions.

use bytes::BytesMut;

use super::{put_message, ready_for_query, Engine, TxEnd};
use crate::clients::stream::ClientStream;
use crate::frontend::client_state::SettingOp;
use crate::frontend::sql_policy::{classify, listen_request, statements, ListenRequest, Statement};
use crate::protocol::framing::cstr;
use crate::protocol::{sqlstate, ErrorReport};

impl Engine {
    /// A query that is one LISTEN or UNLISTEN, from a client with no server connection and no
    /// transaction open, of a tenant that may hear notifications: answered here. Anything
    /// else (inside a transaction block, with other statements, from dynamic SQL) goes to the
    /// server as before, where a LISTEN pins the client or is refused.
    pub(super) async fn listened_locally(&mut self, body: &[u8]) -> bool {
        let text = cstr(body).map(|(t, _)| t).unwrap_or(body);
        let head = text.trim_ascii_start();
        let starts = |k: &[u8]| {
            head.get(..k.len())
                .is_some_and(|h| h.eq_ignore_ascii_case(k))
        };
        if !(starts(b"LISTEN") || starts(b"UNLISTEN")) {
            return false;
        }
        let eligible = self.pool.tenant().tier.rules().notifications
            && self.backend.is_none()
            && !self.pinned
            && self.tx_status == b'I'
            && !self.pipe.awaits_server();
        if !eligible {
            return false;
        }
        let Some(request) = std::str::from_utf8(text).ok().and_then(listen_request) else {
            return false;
        };
        let mut b = BytesMut::with_capacity(32);
        match request {
            ListenRequest::Listen(channel) => {
                let pool = &self.pool;
                let listener = self
                    .listening
                    .get_or_insert_with(|| Box::new(pool.listen_hubs().subscriber(pool.spec())));
                match listener.listen(&channel).await {
                    Ok(()) => put_message(&mut b, b'C', &[b"LISTEN\0"]),
                    Err(report) => report.encode(&mut b),
                }
            }
            ListenRequest::Unlisten(channel) => {
                if let Some(l) = self.listening.as_mut() {
                    l.unlisten(channel.as_deref());
                }
                put_message(&mut b, b'C', &[b"UNLISTEN\0"]);
            }
        }
        if self.listening.as_ref().is_some_and(|l| !l.is_listening()) {
            self.listening = None;
        }
        ready_for_query(&mut b, self.tx_status);
        self.pipe.synthesize(b.freeze());
        self.request_at = None;
        true
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
        let Some(listener) = self.listening.as_ref() else {
            return Ok(());
        };
        let mut out = BytesMut::new();
        let lost = listener.mailbox().drain_into(&mut out).is_err();
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
