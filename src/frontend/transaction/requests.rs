//! What the engine does with each client message: forward it (linking a backend first),
//! re-prepare what it needs, answer it itself, or refuse it; and the session features that pin
//! a client to its backend.

use super::*;

impl Engine {
    /// Handles the whole messages in `cbuf` and drops them from it; a partial one stays, with
    /// room made for the rest.
    pub(super) async fn on_client_bytes(&mut self, cbuf: &mut BytesMut) -> Result<(), TxEnd> {
        self.batch_now = None;
        // Handled in place (no split_to: that would make the buffer shared and allocate), and
        // dropped once at the end: a buffer emptied by `clear` keeps its whole capacity,
        // where one advanced to its end must be reclaimed before it is reused.
        let mut done = 0;
        let handled = loop {
            let rest = &cbuf[done..];
            let (tag, body_len) = match header(rest, self.limits.max_message()) {
                Ok(Some(h)) => h,
                Ok(None) => break Ok(0),
                Err(e) => break Err(TxEnd::ClientError(SessionError::Frame(e))),
            };
            let n = HEADER_LEN + body_len;
            if rest.len() < n {
                break Ok(n - rest.len());
            }
            if let Err(e) = self.on_client_message(tag, &cbuf[done..done + n]).await {
                break Err(e);
            }
            done += n;
        };
        if done == cbuf.len() {
            cbuf.clear();
        } else {
            cbuf.advance(done);
        }
        let missing = handled?;
        if missing > 0 {
            cbuf.reserve(missing);
        }
        Ok(())
    }

    pub(super) async fn on_client_message(&mut self, tag: u8, msg: &[u8]) -> Result<(), TxEnd> {
        let body = &msg[HEADER_LEN..];
        if !is_client_message(tag) {
            return Err(TxEnd::ClientError(SessionError::UnknownMessage(tag)));
        }
        if tag == b'X' {
            return Err(TxEnd::Terminated);
        }
        if self.skipping && tag != b'S' {
            return Ok(());
        }
        if self.listen_pending() && self.on_pending_listen(tag, body).await {
            return Ok(());
        }
        self.note_request(tag);
        match tag {
            b'Q' => self.on_query(tag, msg, body).await?,
            b'P' => self.on_parse(tag, msg, body).await?,
            b'B' => self.on_bind(tag, msg, body).await?,
            b'D' => self.on_describe(tag, msg, body).await?,
            b'C' => self.on_close(tag, msg, body).await?,
            b'E' => self.on_execute(tag, msg).await?,
            b'F' => self.on_function_call(tag, msg).await?,
            b'S' if self.pipe.copy => {
                // PostgreSQL ignores Sync while it is reading COPY data.
                self.forward_if_linked(msg);
            }
            b'S' => self.on_sync(tag, msg).await?,
            b'c' | b'f' => self.on_copy_end(msg),
            // Flush, and CopyData: only meaningful with a backend (in COPY).
            _ => self.forward_if_linked(msg),
        }
        Ok(())
    }

    /// Counts the request and notes when the transaction and the request began.
    fn note_request(&mut self, tag: u8) {
        if self.backend.is_some() && self.tx_began.is_none() {
            // The next transaction on a link that outlived the last one.
            self.tx_began = Some(self.now());
        }
        if matches!(tag, b'Q' | b'E') {
            self.pool.stats().queries.inc();
        }
        if matches!(tag, b'Q' | b'S' | b'F') && self.request_at.is_none() {
            self.request_at = Some(self.now());
        }
    }

    fn forward_if_linked(&mut self, msg: &[u8]) {
        if self.backend.is_some() {
            self.out.extend_from_slice(msg);
        }
    }

    /// Execute: forwarded; its responses end at the next Sync.
    async fn on_execute(&mut self, tag: u8, msg: &[u8]) -> Result<(), TxEnd> {
        if self.link_or_refuse(tag).await? {
            self.unsynced = true;
            self.out.extend_from_slice(msg);
            self.pipe.expect_client(Resp::Execute);
        }
        Ok(())
    }

    /// FunctionCall: forwarded, answered with its own ReadyForQuery.
    async fn on_function_call(&mut self, tag: u8, msg: &[u8]) -> Result<(), TxEnd> {
        if self.link_or_refuse(tag).await? {
            self.out.extend_from_slice(msg);
            self.pipe.expect_client(Resp::FunctionCall);
        }
        Ok(())
    }

    /// CopyDone or CopyFail: ends the copy, or marks where it ended if the server has not
    /// said yet that it is reading COPY data.
    fn on_copy_end(&mut self, msg: &[u8]) {
        if self.backend.is_some() {
            self.out.extend_from_slice(msg);
            if self.pipe.copy {
                self.pipe.copy = false;
            } else {
                self.pipe.queue.push_back(Item::CopyEnd);
            }
        }
    }

    /// Query: a simple-protocol query string, inspected for setting changes and session features before it is forwarded.
    async fn on_query(&mut self, tag: u8, msg: &[u8], body: &[u8]) -> Result<(), TxEnd> {
        // Found once: a query's text is searched for its terminator only here.
        let text = cstr(body).map(|(t, _)| t).unwrap_or(body);
        if self.deallocated_locally(text) || self.listened_locally(text).await {
            return Ok(());
        }
        let (ops, found) = inspect_sql(text);
        self.note_discard_all(&ops, text);
        let (pin, refusal) = self.pin_or_refuse(found);
        if let Some(report) = refusal {
            if self.backend.is_none() {
                report.encode(&mut self.obuf);
                ready_for_query(&mut self.obuf, self.tx_status);
                return Ok(());
            }
            // Inside a transaction the refusal must fail it, as a server error would.
            let raise = raise_statement(&report);
            self.link().await?;
            put_query(&mut self.out, &raise);
            self.pipe.expect_client(Resp::Query);
            return Ok(());
        }
        if self.backend.is_none() {
            self.read_hint = self.reads.split && opens_read_only_transaction(text);
        }
        if !self.link_or_refuse(tag).await? {
            return Ok(());
        }
        self.pending_ops.extend(ops);
        self.unseen_changes |= self.watches_unseen_changes() && may_change_settings_unseen(text);
        self.note_pinning(pin, text);
        self.out.extend_from_slice(msg);
        self.pipe.expect_client(Resp::Query);
        Ok(())
    }
    /// Parse: named statements are renamed pool-wide and answered locally when the pool already knows them.
    async fn on_parse(&mut self, tag: u8, msg: &[u8], body: &[u8]) -> Result<(), TxEnd> {
        let (name, rest) = cstr(body).ok_or_else(|| malformed(tag))?;
        let query = cstr(rest).map(|(q, _)| q).ok_or_else(|| malformed(tag))?;
        if self.parsed_listen_locally(name, query) {
            return Ok(());
        }
        let (ops, found) = inspect_sql(query);
        let (pin, refusal) = self.pin_or_refuse(found);
        if let Some(report) = refusal {
            self.refuse_extended(report);
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
            self.pipe.expect_client(Resp::Parse(None));
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
            self.pipe.synthesize(Bytes::from_static(PARSE_COMPLETE));
            return Ok(());
        }
        if !self.link_or_refuse(tag).await? {
            return Ok(());
        }
        let be = self.backend.as_mut().ok_or(TxEnd::ServerGone)?;
        if be.prepared.contains(&global) {
            self.pipe.synthesize(Bytes::from_static(PARSE_COMPLETE));
        } else {
            be.prepared.insert(global.clone());
            self.out.extend_from_slice(&parse);
            self.pipe.expect_client(Resp::Parse(Some(global.clone())));
            self.evict(&global);
        }
        Ok(())
    }
    /// Bind: to the pool-wide name of the client's statement, prepared on this backend first if it lacks it.
    async fn on_bind(&mut self, tag: u8, msg: &[u8], body: &[u8]) -> Result<(), TxEnd> {
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
        self.pipe.expect_client(Resp::Bind);
        Ok(())
    }
    /// Describe of a statement (by its pool-wide name) or a portal.
    async fn on_describe(&mut self, tag: u8, msg: &[u8], body: &[u8]) -> Result<(), TxEnd> {
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
                    put_message(&mut self.out, b'D', &[b"S", stmt.global.as_bytes(), b"\0"]);
                }
                None => self.out.extend_from_slice(msg),
            }
            self.pipe.expect_client(Resp::DescribeStatement);
        } else {
            self.out.extend_from_slice(msg);
            self.pipe.expect_client(Resp::DescribePortal);
        }
        Ok(())
    }
    /// Close: a named statement is forgotten for this client and answered locally; it stays prepared for others.
    async fn on_close(&mut self, tag: u8, msg: &[u8], body: &[u8]) -> Result<(), TxEnd> {
        let kind = *body.first().ok_or_else(|| malformed(tag))?;
        let (name, _) = cstr(&body[1..]).ok_or_else(|| malformed(tag))?;
        self.unsynced = true;
        if kind == b'S' && !name.is_empty() {
            // The statement stays prepared on backends for other clients.
            self.state.statements.remove(name);
            self.pipe.synthesize(Bytes::from_static(CLOSE_COMPLETE));
        } else {
            if !self.link_or_refuse(tag).await? {
                return Ok(());
            }
            self.out.extend_from_slice(msg);
            self.pipe.expect_client(Resp::Close(None));
        }
        Ok(())
    }
    /// Sync: answered locally when nothing since the last one needed a backend.
    async fn on_sync(&mut self, tag: u8, msg: &[u8]) -> Result<(), TxEnd> {
        self.skipping = false;
        self.unsynced = false;
        if self.backend.is_none() && self.pipe.answered_locally() {
            // Nothing since the last Sync needed a backend (statements answered
            // locally, a refused Parse, or an empty pipeline).
            let mut z = BytesMut::with_capacity(6);
            ready_for_query(&mut z, self.tx_status);
            self.pipe.synthesize(z.freeze());
            return Ok(());
        }
        if !self.link_or_refuse(tag).await? {
            return Ok(());
        }
        self.out.extend_from_slice(msg);
        self.pipe.expect_client(Resp::Sync);
        Ok(())
    }

    /// Schema tier: the pinned `search_path` is restored after a transaction that may have
    /// changed it where no parser sees it.
    pub(super) fn watches_unseen_changes(&self) -> bool {
        self.pool.tenant().tier.rules().pinned_setting.is_some()
    }

    pub(super) fn named(&self, name: &[u8]) -> Option<Arc<ClientStatement>> {
        if name.is_empty() {
            return None;
        }
        self.state.statements.get(name).cloned()
    }

    /// Prepares `stmt` on the linked backend if it lacks it, ahead of the message that needs it.
    pub(super) fn ensure_prepared(&mut self, stmt: &ClientStatement) {
        let Some(be) = self.backend.as_mut() else {
            return;
        };
        if be.prepared.contains(&stmt.global) {
            return;
        }
        be.prepared.insert(stmt.global.clone());
        self.out.extend_from_slice(&stmt.parse);
        self.pipe
            .expect_proxy(Resp::Parse(Some(stmt.global.clone())));
        self.evict(&stmt.global.clone());
    }

    /// SQL `DEALLOCATE name` of a statement the client prepared at protocol level: its name
    /// exists only here (backends know it by a shared name), so it is closed as a protocol
    /// Close would be and answered here. Only when every earlier response is known, so the
    /// ReadyForQuery status is right; true if answered.
    pub(super) fn deallocated_locally(&mut self, text: &[u8]) -> bool {
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
        if self.pipe.awaits_server() || !self.state.statements.contains_key(name.as_bytes()) {
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
        self.pipe.synthesize(b.freeze());
        self.request_at = None;
        true
    }

    /// Closes the least recently used statements beyond the per-backend limit.
    pub(super) fn evict(&mut self, keep: &Arc<str>) {
        let Some(be) = self.backend.as_mut() else {
            return;
        };
        for name in be.prepared.overflow(self.limits.max_prepared(), &[keep]) {
            put_message(&mut self.out, b'C', &[b"S", name.as_bytes(), b"\0"]);
            self.pipe.expect_proxy(Resp::Close(Some(name)));
        }
    }

    /// Splits what a statement uses that outlives its transaction into what pins the client
    /// (the tenant pins) and what is refused (it refuses).
    pub(super) fn pin_or_refuse(
        &self,
        found: Option<&'static str>,
    ) -> (Option<&'static str>, Option<ErrorReport>) {
        let tenant = self.pool.tenant();
        if found == Some("LISTEN") && !tenant.tier.rules().notifications {
            return (None, Some(shared_database_listen_report(tenant.tier)));
        }
        match self.pool.session_features() {
            SessionFeatures::Pin => (found, None),
            SessionFeatures::Refuse if found == Some("LISTEN") => (None, Some(listen_report())),
            SessionFeatures::Refuse => (None, found.map(refusal_report)),
        }
    }

    /// A statement with a session feature (`pin`) keeps the client on its server connection;
    /// a DISCARD ALL of a pinned client lets it go once it has run.
    pub(super) fn note_pinning(&mut self, pin: Option<&'static str>, sql: &[u8]) {
        if let (Some(what), false) = (pin, self.pinned) {
            self.pinned = true;
            self.pool.stats().pinned.inc();
            let shown = String::from_utf8_lossy(&sql[..sql.len().min(200)]);
            tracing::info!(
                tenant = %self.pool.tenant().id,
                feature = what,
                statement = %shown,
                "client pinned to its server connection until it disconnects or runs DISCARD ALL"
            );
        }
        if self.pinned {
            let text = String::from_utf8_lossy(sql);
            self.unpin_requested |= statements(&text)
                .into_iter()
                .any(|s| matches!(classify(s), Statement::DiscardAll));
        }
    }

    pub(super) fn unpin(&mut self) {
        self.unpin_requested = false;
        if std::mem::take(&mut self.pinned) {
            self.pool.stats().pinned.dec();
        }
    }

    pub(super) fn refuse_extended(&mut self, report: ErrorReport) {
        self.skipping = true;
        let mut b = BytesMut::new();
        report.encode(&mut b);
        if self.pipe.queue.is_empty() {
            self.obuf.extend_from_slice(&b);
        } else {
            self.pipe.synthesize(b.freeze());
        }
    }
}

/// The message types a client may send once logged in.
fn is_client_message(tag: u8) -> bool {
    matches!(
        tag,
        b'Q' | b'P' | b'B' | b'D' | b'E' | b'C' | b'H' | b'S' | b'F' | b'd' | b'c' | b'f' | b'X'
    )
}

/// Setting changes a query makes, and the first thing in it transaction pooling cannot serve.
pub(super) fn inspect_sql(text: &[u8]) -> (Vec<SettingOp>, Option<&'static str>) {
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
pub(super) fn pinned_setting(tier: Tier) -> Option<&'static str> {
    tier.rules().pinned_setting
}

/// Whether a client's setting change cleared (or tampered with) its row-tier context.
pub(super) fn clears_row_context(op: &SettingOp) -> bool {
    match op {
        SettingOp::ResetAll => true,
        SettingOp::Set { name, .. } | SettingOp::Reset(name) => {
            row_context::is_reserved_setting(name)
        }
    }
}

pub(super) fn refusal_report(what: &str) -> ErrorReport {
    ErrorReport::error(
        sqlstate::FEATURE_NOT_SUPPORTED,
        format!("{what} cannot be used in transaction pooling mode"),
    )
    .with_hint("use pool_mode = \"session\" for this tenant, or avoid session-level state")
}

/// LISTEN that pgtenant cannot hold for the client (`listening`), where the tenant refuses
/// session features.
fn listen_report() -> ErrorReport {
    ErrorReport::error(
        sqlstate::FEATURE_NOT_SUPPORTED,
        "LISTEN cannot be used in transaction pooling mode inside a transaction block or with other statements",
    )
    .with_hint("send LISTEN on its own between transactions, or use pool_mode = \"session\" or session_features = \"pin\" for this tenant")
}

/// LISTEN by a tenant that shares its database: notification channels are database-wide, so
/// what it would hear is every tenant's; pgtenant delivers none to it.
pub(super) fn shared_database_listen_report(tier: Tier) -> ErrorReport {
    ErrorReport::error(
        sqlstate::FEATURE_NOT_SUPPORTED,
        format!(
            "LISTEN is not available to {} tier tenants: PostgreSQL's notification channels are database-wide, and this tenant shares its database with others",
            tier.as_str()
        ),
    )
    .with_hint("give the tenant the database tier to use LISTEN/NOTIFY")
}

/// A statement that fails with `report`'s SQLSTATE, message and hint on the server, so the
/// refusal aborts the client's transaction exactly like a server-side error would.
pub(super) fn raise_statement(report: &ErrorReport) -> String {
    let lit = |s: &str| s.replace('\'', "''").replace('$', "");
    format!(
        "DO $pgtenant$BEGIN RAISE EXCEPTION USING ERRCODE = '{}', MESSAGE = '{}', HINT = '{}'; END$pgtenant$",
        report.code,
        lit(&report.message),
        lit(report.hint.as_deref().unwrap_or(""))
    )
}
