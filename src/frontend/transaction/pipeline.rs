//! Which server message answers which request, as a pure struct: no sockets, pools or metrics.
//!
//! Every message the engine sends to a server connection gets an entry here (PgDog's design):
//! responses to the client's messages are forwarded, responses to what pgtenant injected
//! (a reset, the client's settings, a re-prepare, the row binding) are swallowed, and answers
//! pgtenant gives itself (ParseComplete of a statement the connection already has,
//! CloseComplete of a client's Close, a refusal) are emitted in their place in the order.
//! `scan` walks the server's bytes, decides forward or swallow per message, and reports what
//! the engine must apply (to the connection, the pool and the client's session) through
//! `Effects`. These are the rules that keep one client's responses, and one tenant's state,
//! from reaching another; the tests at the end feed them byte fixtures.

use std::collections::VecDeque;
use std::sync::Arc;

use bytes::{Buf, Bytes, BytesMut};

use super::recovery::fatal_report;
use crate::protocol::framing::{cstr, header, FrameError, HEADER_LEN};
use crate::protocol::ErrorReport;
use crate::tenancy::row_context;

pub use crate::protocol::framing::{INSPECT_LIMIT, MAX_SERVER_MESSAGE};

/// The response(s) one message sent to the backend produces.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Resp {
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
    RowBind(Arc<str>),
    /// A Query that opens a transaction and fails it on purpose: the client's transaction was
    /// lost with its server connection, and its next statements must fail as PostgreSQL's
    /// would in an aborted transaction, until it ends it.
    Abort,
}

impl Resp {
    /// Ends with ReadyForQuery (an error does not end it).
    pub fn ends_with_ready(&self) -> bool {
        matches!(
            self,
            Resp::Sync | Resp::Query | Resp::FunctionCall | Resp::Abort
        )
    }
}

#[derive(Debug)]
pub enum Item {
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

/// A ReadyForQuery, with what is still expected after it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ready {
    /// The transaction status it carries.
    pub status: u8,
    /// It answers a client's request (not one of pgtenant's).
    pub client: bool,
    /// More client requests that end with a ReadyForQuery are pending behind it.
    pub more_replies: bool,
    /// Any client request is pending behind it.
    pub more_requests: bool,
    /// Nothing at all is expected any more.
    pub idle: bool,
}

/// What a server message tells the engine beyond forward or swallow.
pub trait Effects {
    fn parameter_status(&mut self, name: &[u8], value: &[u8]);
    /// The server is closing the connection with this error (FATAL or PANIC); the message is
    /// swallowed, for the client keeps its own connection and is told as an ERROR.
    fn server_fatal(&mut self, report: ErrorReport);
    /// A statement prepared under its pool-wide name parsed: its SQL is valid for the pool.
    fn parsed(&mut self, name: &Arc<str>);
    /// The connection no longer has `name` prepared: pgtenant's Close of it completed, or a
    /// Parse of it failed or was skipped.
    fn unprepared(&mut self, name: &Arc<str>);
    /// An ErrorResponse answered a client's request (body when examined).
    fn client_error(&mut self, body: Option<&[u8]>);
    /// pgtenant's replay of the client's settings failed.
    fn replay_failed(&mut self);
    /// A message of pgtenant's row binding failed: the connection is bound to no tenant.
    fn binding_failed(&mut self);
    fn ready(&mut self, ready: Ready);
    /// CommandComplete of a client's command: its tag (DISCARD ALL, DEALLOCATE ALL, BEGIN...).
    fn command_done(&mut self, tag: &[u8]);
    /// The row binding's own CommandComplete: whether the server accepted it.
    fn row_bound(&mut self, tenant: &Arc<str>, accepted: bool);
}

/// The server said something no request explains: the connection cannot be trusted to be in
/// step with its client any more, and is closed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Desync {
    #[error("server sent a message with an invalid length ({0} bytes)")]
    BadLength(usize),
    #[error("server sent an unexpected message of type '{}'", char::from(*.0))]
    Unexpected(u8),
}

/// How far `scan` got.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Scanned {
    /// Input bytes consumed (forwarded, swallowed, or part of a message being streamed).
    pub consumed: usize,
    /// Room the input buffer needs beyond what is left, to hold a message to examine whole.
    pub need: usize,
}

#[derive(Debug)]
pub struct Pipeline {
    pub(super) queue: VecDeque<Item>,
    /// The server is reading COPY data from the client (CopyInResponse seen, not yet ended).
    pub(super) copy: bool,
    /// Body bytes of the server message being streamed, and whether it goes to the client.
    /// (u32: a message is at most MAX_SERVER_MESSAGE, and every idle client holds this.)
    remaining: u32,
    forward: bool,
    last_tag: u8,
    /// NotificationResponses go to the client (`TierRules::notifications`); otherwise they
    /// are dropped, whoever LISTENed.
    notifications: bool,
}

impl Default for Pipeline {
    fn default() -> Self {
        Pipeline::new(true)
    }
}

impl Pipeline {
    pub fn new(notifications: bool) -> Pipeline {
        Pipeline {
            queue: VecDeque::new(),
            copy: false,
            remaining: 0,
            forward: true,
            last_tag: 0,
            notifications,
        }
    }

    pub fn expect_client(&mut self, r: Resp) {
        self.queue.push_back(Item::Client(r));
    }

    pub fn expect_proxy(&mut self, r: Resp) {
        self.queue.push_back(Item::Proxy(r));
    }

    pub fn synthesize(&mut self, bytes: Bytes) {
        self.queue.push_back(Item::Synthetic(bytes));
    }

    /// Body bytes of a server message still to come (0: at a message boundary).
    pub fn mid_message(&self) -> usize {
        self.remaining as usize
    }

    /// Type of the last server message seen.
    pub fn last_tag(&self) -> u8 {
        self.last_tag
    }

    /// Nothing more is expected of the server and nothing is left to emit.
    pub fn is_done(&self) -> bool {
        self.queue.is_empty() && !self.copy && self.remaining == 0
    }

    /// Every entry is one pgtenant answers itself: nothing needs the server.
    pub fn answered_locally(&self) -> bool {
        self.queue
            .iter()
            .all(|i| matches!(i, Item::Synthetic(_) | Item::CopyEnd))
    }

    /// Some response of the server's is still expected.
    pub fn awaits_server(&self) -> bool {
        self.queue
            .iter()
            .any(|i| matches!(i, Item::Client(_) | Item::Proxy(_)))
    }

    /// Some client request still waits for its response.
    pub fn client_waiting(&self) -> bool {
        self.queue.iter().any(|i| matches!(i, Item::Client(_)))
    }

    /// ReadyForQuery still due to the client or to pgtenant.
    pub fn pending_ready(&self) -> u32 {
        self.queue
            .iter()
            .filter(|i| matches!(i, Item::Client(r) | Item::Proxy(r) if r.ends_with_ready()))
            .count() as u32
    }

    /// Forgets the connection: a new one starts at a message boundary with nothing expected.
    pub fn reset(&mut self) {
        *self = Pipeline::new(self.notifications);
    }

    /// Emits the answers pgtenant gives itself that are next in order.
    pub fn emit_synthetics(&mut self, out: &mut BytesMut) {
        loop {
            match self.queue.front() {
                Some(Item::Synthetic(_)) => {
                    if let Some(Item::Synthetic(b)) = self.queue.pop_front() {
                        out.extend_from_slice(&b);
                    }
                }
                Some(Item::CopyEnd) => {
                    self.queue.pop_front();
                }
                _ => return,
            }
        }
    }

    fn synthetic_next(&self) -> bool {
        matches!(self.queue.front(), Some(Item::Synthetic(_) | Item::CopyEnd))
    }

    /// Walks the server's output message by message, appending what goes to the client to
    /// `out`. Forwarded bytes are copied in runs (one copy for a whole batch of rows),
    /// interrupted only by a swallowed message or by answers pgtenant gives itself. A message
    /// may end beyond `input`: its rest is streamed through the next calls.
    pub fn scan(
        &mut self,
        input: &[u8],
        out: &mut BytesMut,
        fx: &mut impl Effects,
    ) -> Result<Scanned, Desync> {
        // Forwarded bytes [run, pos) not yet copied.
        let (mut pos, mut run) = self.continue_message(input, out);
        let mut need = 0;
        while self.remaining == 0 {
            let rest = &input[pos..];
            let (tag, body_len) = match header(rest, MAX_SERVER_MESSAGE) {
                Ok(Some(h)) => h,
                Ok(None) => break,
                Err(FrameError::BadLength { len, .. }) => {
                    return Err(Desync::BadLength(len as usize))
                }
                Err(FrameError::TooLarge { len, .. }) => return Err(Desync::BadLength(len)),
            };
            let inspect = matches!(tag, b'Z' | b'C' | b'S' | b'E') && body_len <= INSPECT_LIMIT;
            if inspect && rest.len() < HEADER_LEN + body_len {
                need = HEADER_LEN + body_len;
                break;
            }
            let forward = if tag == b'D' && !self.queue.is_empty() {
                // Rows: nothing to inspect, and they are most of what a server sends.
                !matches!(self.queue.front(), Some(Item::Proxy(_)))
            } else {
                let body = inspect.then(|| &rest[HEADER_LEN..HEADER_LEN + body_len]);
                self.on_message(tag, body, fx)?
            };
            let avail = (rest.len() - HEADER_LEN).min(body_len);
            if !forward {
                out.extend_from_slice(&input[run..pos]);
                run = pos + HEADER_LEN + avail;
            }
            self.forward = forward;
            self.last_tag = tag;
            pos += HEADER_LEN + avail;
            // body_len - avail <= MAX_SERVER_MESSAGE, checked above.
            self.remaining = (body_len - avail) as u32;
            if self.remaining == 0 && self.synthetic_next() {
                out.extend_from_slice(&input[run..pos]);
                run = pos;
                self.emit_synthetics(out);
            }
        }
        if run < pos {
            out.extend_from_slice(&input[run..pos]);
        }
        Ok(Scanned {
            consumed: pos,
            need,
        })
    }

    /// The rest of a message begun in an earlier input: how much of `input` it takes, and
    /// where the run of forwarded bytes not yet copied starts.
    fn continue_message(&mut self, input: &[u8], out: &mut BytesMut) -> (usize, usize) {
        let n = (self.remaining as usize).min(input.len());
        let mut run = if self.forward { 0 } else { n };
        self.remaining -= n as u32;
        if n > 0 && self.remaining == 0 && self.synthetic_next() {
            out.extend_from_slice(&input[run..n]);
            run = n;
            self.emit_synthetics(out);
        }
        (n, run)
    }

    /// One server message (its body when examined): whether it goes to the client.
    pub fn on_message(
        &mut self,
        tag: u8,
        body: Option<&[u8]>,
        fx: &mut impl Effects,
    ) -> Result<bool, Desync> {
        if tag == b'E' {
            if let Some(report) = body.and_then(fatal_report) {
                fx.server_fatal(report);
                return Ok(false);
            }
        }
        let (proxy, resp) = match self.queue.front() {
            Some(Item::Client(r)) => (false, r.clone()),
            Some(Item::Proxy(r)) => (true, r.clone()),
            // Nothing expected: only what a server may send at any time.
            _ => {
                return match tag {
                    b'N' => Ok(true),
                    b'A' => Ok(self.notifications),
                    b'S' => {
                        parameter_status(body, fx);
                        Ok(true)
                    }
                    _ => Err(Desync::Unexpected(tag)),
                }
            }
        };
        match tag {
            b'N' => return Ok(!proxy),
            b'A' => return Ok(!proxy && self.notifications),
            b'S' => parameter_status(body, fx),
            b'E' => return Ok(self.on_error(body, proxy, &resp, fx)),
            b'Z' => return Ok(self.on_ready(body, proxy, fx)),
            b'1' | b'2' | b'3' => {
                self.queue.pop_front();
                match (&resp, proxy) {
                    (Resp::Parse(Some(name)), _) => fx.parsed(name),
                    (Resp::Close(Some(name)), true) => fx.unprepared(name),
                    _ => {}
                }
            }
            b'n' | b'T' if matches!(resp, Resp::DescribeStatement | Resp::DescribePortal) => {
                self.queue.pop_front();
            }
            b'C' | b'I' | b's' => self.on_command_done(body, proxy, &resp, fx),
            b'G' => self.on_copy_in_response(),
            _ => {}
        }
        Ok(!proxy)
    }

    /// ErrorResponse: the request it answers failed, and so does everything the server skips
    /// up to the next Sync. Whether the client is told.
    fn on_error(
        &mut self,
        body: Option<&[u8]>,
        proxy: bool,
        resp: &Resp,
        fx: &mut impl Effects,
    ) -> bool {
        if proxy && matches!(resp, Resp::Abort) {
            // Failed on purpose.
            return false;
        }
        if proxy && matches!(resp, Resp::Query) {
            fx.replay_failed();
            return false;
        }
        if !proxy {
            fx.client_error(body);
        }
        // The binding's own messages: the connection stays bound to nobody, and the client,
        // which did not send them, is not told (its statements fail closed).
        let binding = proxy && matches!(resp, Resp::Parse(None) | Resp::Bind | Resp::RowBind(_));
        if binding {
            fx.binding_failed();
        }
        if !resp.ends_with_ready() {
            self.queue.pop_front();
            forget_failed(resp, fx);
            // The server skips everything up to the next Sync.
            while let Some(item) = self.queue.front() {
                match item {
                    Item::Client(Resp::Sync) | Item::Proxy(Resp::Sync) => break,
                    Item::Client(r) | Item::Proxy(r) => {
                        forget_failed(r, fx);
                        self.queue.pop_front();
                    }
                    Item::Synthetic(_) | Item::CopyEnd => {
                        self.queue.pop_front();
                    }
                }
            }
        }
        // An error from an injected Parse stands for the client's message it served.
        !binding
    }

    /// ReadyForQuery: a request is complete. Whether the client is told.
    fn on_ready(&mut self, body: Option<&[u8]>, proxy: bool, fx: &mut impl Effects) -> bool {
        let status = body.and_then(|b| b.first().copied()).unwrap_or(b'I');
        self.queue.pop_front();
        self.copy = false;
        let more_replies = self
            .queue
            .iter()
            .any(|i| matches!(i, Item::Client(r) if r.ends_with_ready()));
        fx.ready(Ready {
            status,
            client: !proxy,
            more_replies,
            more_requests: self.client_waiting(),
            idle: self.queue.is_empty(),
        });
        !proxy
    }

    /// CommandComplete, EmptyQueryResponse, PortalSuspended: the client's command tags, and
    /// the row binding's confirmation.
    fn on_command_done(
        &mut self,
        body: Option<&[u8]>,
        proxy: bool,
        resp: &Resp,
        fx: &mut impl Effects,
    ) {
        let text = body.and_then(cstr).map(|(t, _)| t);
        if let (Some(t), false) = (text, proxy) {
            fx.command_done(t);
        }
        match resp {
            Resp::Execute => {
                self.queue.pop_front();
            }
            Resp::RowBind(tenant) => {
                self.queue.pop_front();
                fx.row_bound(tenant, text == Some(row_context::ACCEPTED_TAG.as_bytes()));
            }
            _ => {}
        }
    }

    /// CopyInResponse: Syncs the client pipelined after the COPY, up to where it ended the
    /// copy, reach the server during copy-in and are ignored: nothing is expected of them.
    fn on_copy_in_response(&mut self) {
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
}

fn parameter_status(body: Option<&[u8]>, fx: &mut impl Effects) {
    if let Some((k, rest)) = body.and_then(cstr) {
        if let Some((v, _)) = cstr(rest) {
            fx.parameter_status(k, v);
        }
    }
}

/// A Parse that failed or was skipped never prepared its statement.
fn forget_failed(resp: &Resp, fx: &mut impl Effects) {
    if let Resp::Parse(Some(name)) = resp {
        fx.unprepared(name);
    }
}

/// Drops `n` consumed bytes from the front of a server read buffer, keeping room for `need`.
pub(super) fn consume(buf: &mut BytesMut, s: Scanned) {
    buf.advance(s.consumed);
    if s.need > 0 {
        buf.reserve(s.need);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Records every effect, in order, as text.
    #[derive(Default)]
    struct Recorder(Vec<String>);

    impl Effects for Recorder {
        fn parameter_status(&mut self, name: &[u8], value: &[u8]) {
            self.0.push(format!(
                "param {}={}",
                String::from_utf8_lossy(name),
                String::from_utf8_lossy(value)
            ));
        }
        fn server_fatal(&mut self, report: ErrorReport) {
            self.0.push(format!("fatal {}", report.code));
        }
        fn parsed(&mut self, name: &Arc<str>) {
            self.0.push(format!("parsed {name}"));
        }
        fn unprepared(&mut self, name: &Arc<str>) {
            self.0.push(format!("unprepared {name}"));
        }
        fn client_error(&mut self, _body: Option<&[u8]>) {
            self.0.push("client error".into());
        }
        fn replay_failed(&mut self) {
            self.0.push("replay failed".into());
        }
        fn binding_failed(&mut self) {
            self.0.push("binding failed".into());
        }
        fn ready(&mut self, r: Ready) {
            self.0.push(format!(
                "ready {} client={} more={}",
                char::from(r.status),
                r.client,
                r.more_replies
            ));
        }
        fn command_done(&mut self, tag: &[u8]) {
            self.0
                .push(format!("command {}", String::from_utf8_lossy(tag)));
        }
        fn row_bound(&mut self, tenant: &Arc<str>, accepted: bool) {
            self.0.push(format!("bound {tenant} {accepted}"));
        }
    }

    fn msg(tag: u8, body: &[u8]) -> Vec<u8> {
        let mut m = vec![tag];
        m.extend_from_slice(&(body.len() as u32 + 4).to_be_bytes());
        m.extend_from_slice(body);
        m
    }

    fn parse_complete() -> Vec<u8> {
        msg(b'1', b"")
    }
    fn bind_complete() -> Vec<u8> {
        msg(b'2', b"")
    }
    fn row() -> Vec<u8> {
        msg(b'D', b"\0\x01\0\0\0\x011")
    }
    fn complete(tag: &str) -> Vec<u8> {
        msg(b'C', format!("{tag}\0").as_bytes())
    }
    fn ready(status: u8) -> Vec<u8> {
        msg(b'Z', &[status])
    }
    fn error(severity: &str, code: &str) -> Vec<u8> {
        msg(
            b'E',
            format!("S{severity}\0V{severity}\0C{code}\0Mboom\0\0").as_bytes(),
        )
    }

    fn cat(parts: &[Vec<u8>]) -> Vec<u8> {
        parts.concat()
    }

    fn pipeline(items: Vec<Item>) -> Pipeline {
        Pipeline {
            queue: items.into(),
            ..Pipeline::default()
        }
    }

    /// Scans `input` whole: what reached the client, and the effects.
    fn feed(p: &mut Pipeline, input: &[u8]) -> (Vec<u8>, Vec<String>) {
        let mut out = BytesMut::new();
        let mut fx = Recorder::default();
        let s = p.scan(input, &mut out, &mut fx).expect("in step");
        assert_eq!(s.consumed, input.len(), "every byte consumed");
        (out.to_vec(), fx.0)
    }

    fn name(s: &str) -> Arc<str> {
        Arc::from(s)
    }

    use Item::{Client, Proxy};

    #[test]
    fn pipelined_extended_queries_with_several_syncs_are_forwarded_in_order() {
        let mut p = pipeline(vec![
            Client(Resp::Parse(None)),
            Client(Resp::Bind),
            Client(Resp::Execute),
            Client(Resp::Sync),
            Client(Resp::Bind),
            Client(Resp::Execute),
            Client(Resp::Sync),
        ]);
        let server = cat(&[
            parse_complete(),
            bind_complete(),
            row(),
            complete("SELECT 1"),
            ready(b'I'),
            bind_complete(),
            row(),
            complete("SELECT 1"),
            ready(b'I'),
        ]);
        let (out, fx) = feed(&mut p, &server);
        assert_eq!(out, server);
        assert_eq!(
            fx,
            [
                "command SELECT 1",
                "ready I client=true more=true",
                "command SELECT 1",
                "ready I client=true more=false"
            ]
        );
        assert!(p.is_done());
    }

    #[test]
    fn an_error_mid_pipeline_skips_everything_up_to_its_sync() {
        let mut p = pipeline(vec![
            Client(Resp::Parse(Some(name("s1")))),
            Client(Resp::Bind),
            Client(Resp::Execute),
            Client(Resp::Sync),
            Client(Resp::Query),
        ]);
        let server = cat(&[error("ERROR", "42601"), ready(b'I')]);
        let (out, fx) = feed(&mut p, &server);
        assert_eq!(
            out, server,
            "the client sees the error and its ReadyForQuery"
        );
        assert_eq!(
            fx,
            [
                "client error",
                "unprepared s1",
                "ready I client=true more=true"
            ]
        );
        assert_eq!(
            p.queue.len(),
            1,
            "only the query after the Sync is still expected"
        );
    }

    #[test]
    fn a_reprepared_statements_parse_complete_is_swallowed() {
        let mut p = pipeline(vec![
            Proxy(Resp::Parse(Some(name("g7")))),
            Client(Resp::Bind),
            Client(Resp::Execute),
            Client(Resp::Sync),
        ]);
        let client_part = cat(&[bind_complete(), row(), complete("SELECT 1"), ready(b'I')]);
        let (out, fx) = feed(&mut p, &cat(&[parse_complete(), client_part.clone()]));
        assert_eq!(out, client_part, "the client never sent that Parse");
        assert_eq!(fx[0], "parsed g7");
    }

    #[test]
    fn a_row_tenant_switch_is_swallowed_and_its_tag_checked() {
        let mut p = pipeline(vec![
            Proxy(Resp::Query),
            Proxy(Resp::Parse(None)),
            Proxy(Resp::Bind),
            Proxy(Resp::RowBind(name("acme"))),
            Proxy(Resp::Sync),
            Client(Resp::Query),
        ]);
        let switch = cat(&[
            complete("RESET"),
            ready(b'I'),
            parse_complete(),
            bind_complete(),
            complete("SELECT 1"),
            ready(b'I'),
        ]);
        let client_part = cat(&[row(), complete("SELECT 1"), ready(b'I')]);
        let (out, fx) = feed(&mut p, &cat(&[switch, client_part.clone()]));
        assert_eq!(out, client_part, "nothing of the switch reaches the client");
        assert!(fx.contains(&"bound acme true".to_string()));
        let commands: Vec<&String> = fx.iter().filter(|e| e.starts_with("command")).collect();
        assert_eq!(
            commands,
            ["command SELECT 1"],
            "pgtenant's own tags are not the client's commands"
        );
    }

    #[test]
    fn a_row_binding_answered_with_another_tag_is_refused() {
        let mut p = pipeline(vec![Proxy(Resp::RowBind(name("acme"))), Proxy(Resp::Sync)]);
        let (out, fx) = feed(&mut p, &cat(&[complete("SELECT 0"), ready(b'I')]));
        assert!(out.is_empty());
        assert_eq!(fx[0], "bound acme false");
    }

    #[test]
    fn a_failed_row_binding_is_not_told_to_the_client() {
        let mut p = pipeline(vec![
            Proxy(Resp::Parse(None)),
            Proxy(Resp::Bind),
            Proxy(Resp::RowBind(name("acme"))),
            Proxy(Resp::Sync),
            Client(Resp::Query),
        ]);
        let (out, fx) = feed(&mut p, &cat(&[error("ERROR", "42501"), ready(b'I')]));
        assert!(out.is_empty(), "the client did not send the binding");
        assert_eq!(fx[0], "binding failed");
        assert_eq!(p.queue.len(), 1);
    }

    #[test]
    fn copy_in_ignores_the_syncs_sent_during_the_copy() {
        // P B E S, CopyData, CopyDone (before the server's CopyInResponse was seen), S.
        let mut p = pipeline(vec![
            Client(Resp::Parse(None)),
            Client(Resp::Bind),
            Client(Resp::Execute),
            Client(Resp::Sync),
            Item::CopyEnd,
            Client(Resp::Sync),
        ]);
        let server = cat(&[
            parse_complete(),
            bind_complete(),
            msg(b'G', b"\0\0\0"),
            complete("COPY 2"),
            ready(b'I'),
        ]);
        let (out, fx) = feed(&mut p, &server);
        assert_eq!(out, server);
        assert_eq!(fx, ["command COPY 2", "ready I client=true more=false"]);
        assert!(p.is_done());
    }

    #[test]
    fn copy_in_lasts_until_the_servers_ready_for_query() {
        let mut p = pipeline(vec![Client(Resp::Query)]);
        feed(&mut p, &msg(b'G', b"\0\0\0"));
        assert!(p.copy, "the server reads COPY data now");
        assert!(!p.is_done());
        feed(&mut p, &cat(&[complete("COPY 1"), ready(b'I')]));
        assert!(!p.copy);
        assert!(p.is_done());
    }

    #[test]
    fn copy_out_is_forwarded_whole() {
        let mut p = pipeline(vec![Client(Resp::Query)]);
        let server = cat(&[
            msg(b'H', b"\0\0\0"),
            msg(b'd', b"1\n"),
            msg(b'd', b"2\n"),
            msg(b'c', b""),
            complete("COPY 2"),
            ready(b'I'),
        ]);
        let (out, _) = feed(&mut p, &server);
        assert_eq!(out, server);
        assert!(p.is_done());
    }

    #[test]
    fn a_failed_transaction_reports_its_status_until_rollback() {
        let mut p = pipeline(vec![Client(Resp::Query)]);
        let (_, fx) = feed(
            &mut p,
            &cat(&[complete("BEGIN"), error("ERROR", "22012"), ready(b'E')]),
        );
        assert_eq!(
            fx,
            [
                "command BEGIN",
                "client error",
                "ready E client=true more=false"
            ]
        );
        p.expect_client(Resp::Query);
        let (_, fx) = feed(&mut p, &cat(&[error("ERROR", "25P02"), ready(b'E')]));
        assert_eq!(
            fx.last().map(String::as_str),
            Some("ready E client=true more=false")
        );
        p.expect_client(Resp::Query);
        let (_, fx) = feed(&mut p, &cat(&[complete("ROLLBACK"), ready(b'I')]));
        assert_eq!(fx, ["command ROLLBACK", "ready I client=true more=false"]);
    }

    #[test]
    fn discard_all_and_deallocate_all_are_reported_for_client_commands_only() {
        let mut p = pipeline(vec![
            Proxy(Resp::Query),
            Client(Resp::Query),
            Client(Resp::Query),
        ]);
        let (_, fx) = feed(
            &mut p,
            &cat(&[
                complete("DISCARD ALL"),
                ready(b'I'),
                complete("DISCARD ALL"),
                ready(b'I'),
                complete("DEALLOCATE ALL"),
                ready(b'I'),
            ]),
        );
        let commands: Vec<&String> = fx.iter().filter(|e| e.starts_with("command")).collect();
        assert_eq!(commands, ["command DISCARD ALL", "command DEALLOCATE ALL"]);
    }

    #[test]
    fn an_unexpected_server_message_is_a_desync_never_forwarded() {
        for tag in [b'D', b'C', b'Z', b'1', b'T'] {
            let mut p = Pipeline::default();
            let mut out = BytesMut::new();
            let r = p.scan(&msg(tag, b"x\0"), &mut out, &mut Recorder::default());
            assert_eq!(r, Err(Desync::Unexpected(tag)));
            assert!(out.is_empty(), "nothing of it reaches the client");
        }
    }

    #[test]
    fn notices_notifications_and_parameter_status_may_come_at_any_time() {
        let mut p = Pipeline::default();
        let server = cat(&[
            msg(b'N', b"SNOTICE\0Mhi\0\0"),
            msg(b'A', b"\0\0\0\x07jobs\0x\0"),
            msg(b'S', b"TimeZone\0UTC\0"),
        ]);
        let (out, fx) = feed(&mut p, &server);
        assert_eq!(out, server);
        assert_eq!(fx, ["param TimeZone=UTC"]);
    }

    #[test]
    fn notifications_are_dropped_for_a_tenant_that_shares_its_database() {
        let notification = msg(b'A', b"\0\0\0\x07jobs\0another tenant's\0");
        let mut idle = Pipeline::new(false);
        let (out, _) = feed(&mut idle, &notification);
        assert!(out.is_empty(), "between transactions");
        let mut busy = Pipeline::new(false);
        busy.expect_client(Resp::Query);
        let (out, _) = feed(
            &mut busy,
            &cat(&[notification, complete("SELECT 1"), ready(b'I')]),
        );
        assert_eq!(
            out,
            cat(&[complete("SELECT 1"), ready(b'I')]),
            "during a query"
        );
    }

    #[test]
    fn a_notice_during_pgtenants_own_query_is_swallowed() {
        let mut p = pipeline(vec![Proxy(Resp::Query)]);
        let (out, fx) = feed(
            &mut p,
            &cat(&[msg(b'N', b"SNOTICE\0Mx\0\0"), complete("SET"), ready(b'I')]),
        );
        assert!(out.is_empty());
        assert_eq!(fx, ["ready I client=false more=false"]);
    }

    #[test]
    fn a_fatal_error_is_swallowed_and_reported() {
        let mut p = pipeline(vec![Client(Resp::Query)]);
        let (out, fx) = feed(&mut p, &error("FATAL", "57P01"));
        assert!(
            out.is_empty(),
            "the client is told as an ERROR when the server closes"
        );
        assert_eq!(fx, ["fatal 57P01"]);
    }

    #[test]
    fn a_failed_settings_replay_is_swallowed() {
        let mut p = pipeline(vec![Proxy(Resp::Query), Client(Resp::Query)]);
        let (out, fx) = feed(&mut p, &cat(&[error("ERROR", "22023"), ready(b'I')]));
        assert!(out.is_empty());
        assert_eq!(fx[0], "replay failed");
    }

    #[test]
    fn a_message_split_across_reads_is_streamed_through() {
        let mut p = pipeline(vec![Client(Resp::Query)]);
        let big = msg(b'D', &vec![7u8; 1000]);
        let (first, second) = big.split_at(300);
        let (out1, _) = feed(&mut p, first);
        assert_eq!(out1, first);
        assert_eq!(p.mid_message(), 1000 + HEADER_LEN - 300);
        let (out2, _) = feed(&mut p, second);
        assert_eq!(out2, second);
        assert_eq!(p.mid_message(), 0);
    }

    #[test]
    fn a_message_to_examine_waits_until_it_is_whole() {
        let mut p = pipeline(vec![Client(Resp::Query)]);
        let z = ready(b'I');
        let mut out = BytesMut::new();
        let s = p
            .scan(&z[..3], &mut out, &mut Recorder::default())
            .expect("in step");
        assert_eq!(s.consumed, 0, "a partial header waits");
        let tag = complete("SELECT 1");
        let s = p
            .scan(&tag[..7], &mut out, &mut Recorder::default())
            .expect("in step");
        assert_eq!((s.consumed, s.need), (0, tag.len()));
        assert!(out.is_empty());
    }

    #[test]
    fn answers_pgtenant_gives_itself_are_emitted_in_their_place() {
        let mut p = pipeline(vec![
            Client(Resp::Bind),
            Item::Synthetic(Bytes::from_static(b"3\0\0\0\x04")),
            Client(Resp::Sync),
        ]);
        let (out, _) = feed(&mut p, &cat(&[bind_complete(), ready(b'I')]));
        assert_eq!(out, cat(&[bind_complete(), msg(b'3', b""), ready(b'I')]));
    }

    #[test]
    fn an_evicted_statements_close_is_swallowed_and_forgotten() {
        let mut p = pipeline(vec![
            Proxy(Resp::Close(Some(name("old")))),
            Client(Resp::Sync),
        ]);
        let (out, fx) = feed(&mut p, &cat(&[msg(b'3', b""), ready(b'I')]));
        assert_eq!(out, ready(b'I'));
        assert_eq!(fx[0], "unprepared old");
    }

    #[test]
    fn a_length_below_four_is_a_desync() {
        let mut p = pipeline(vec![Client(Resp::Query)]);
        let r = p.scan(
            b"Z\0\0\0\x02",
            &mut BytesMut::new(),
            &mut Recorder::default(),
        );
        assert_eq!(r, Err(Desync::BadLength(2)));
    }
}
