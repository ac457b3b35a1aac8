//! What the engine does with each server message: match it to its request in the queue of
//! expected responses, forward or swallow it, and learn from it (ReadyForQuery, command tags,
//! parameter status, COPY, a FATAL before the server closes).

use super::*;

impl Engine {
    pub(super) fn on_server_bytes(&mut self) -> Result<(), TxEnd> {
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
    pub(super) fn scan_server(&mut self, be: &mut PooledBackend) -> Result<(), TxEnd> {
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
    pub(super) fn synthetic_next(&self) -> bool {
        matches!(self.queue.front(), Some(Item::Synthetic(_) | Item::CopyEnd))
    }

    /// Updates the expected-response queue for one server message; true if it goes to the client.
    pub(super) fn on_server_message(
        &mut self,
        be: &mut PooledBackend,
        tag: u8,
        body: Option<&[u8]>,
    ) -> bool {
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
            b'E' => return self.on_error_response(be, body, proxy, &resp),
            b'Z' => return self.on_ready_for_query(be, body, proxy),
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
            b'C' | b'I' | b's' => self.on_command_done(be, body, proxy, &resp),
            b'G' => self.on_copy_in_response(),
            _ => {}
        }
        !proxy
    }

    /// ErrorResponse: the request it answers failed, and so does everything the server skips up to the next Sync. Whether the client is told.
    fn on_error_response(
        &mut self,
        be: &mut PooledBackend,
        body: Option<&[u8]>,
        proxy: bool,
        resp: &Resp,
    ) -> bool {
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
        let binding = proxy && matches!(resp, Resp::Parse(None) | Resp::Bind | Resp::RowBind(_));
        if binding {
            tracing::warn!("row-tier binding of a server connection failed");
        }
        if !resp.ends_with_ready() {
            self.queue.pop_front();
            self.forget_failed(be, resp);
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
        !binding
    }
    /// ReadyForQuery: a request is complete; at the end of a transaction, the client's setting changes are kept (the tier's pin and a cleared row context excepted). Whether the client is told.
    fn on_ready_for_query(
        &mut self,
        be: &mut PooledBackend,
        body: Option<&[u8]>,
        proxy: bool,
    ) -> bool {
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
                self.keep_setting_changes(be);
                self.tx_failed = false;
                if self.unpin_requested && self.queue.is_empty() {
                    tracing::info!(tenant = %self.pool.tenant().id, "client unpinned by DISCARD ALL");
                    self.unpin();
                }
            }
        }
        !proxy
    }
    /// CommandComplete, EmptyQueryResponse, PortalSuspended: what the command changed of the session (DISCARD, DEALLOCATE ALL, ROLLBACK, BEGIN), and the row binding's confirmation.
    fn on_command_done(
        &mut self,
        be: &mut PooledBackend,
        body: Option<&[u8]>,
        proxy: bool,
        resp: &Resp,
    ) {
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
        match resp {
            Resp::Execute => {
                self.queue.pop_front();
            }
            Resp::RowBind(tenant) => {
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
    /// CopyInResponse: Syncs pipelined behind the COPY reach the server during copy-in and are ignored, so nothing is expected of them.
    fn on_copy_in_response(&mut self) {
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

    /// A Parse that failed or was skipped never prepared its statement.
    pub(super) fn forget_failed(&mut self, be: &mut PooledBackend, resp: &Resp) {
        if let Resp::Parse(Some(name)) = resp {
            be.prepared.remove(name);
        }
    }

    /// At the end of a transaction: the client's setting changes become its session's (the
    /// tier's pin excepted: a change lasts to the end of its transaction), and a cleared row
    /// context or a pin changed where no parser saw it sends the connection through a reset
    /// or a rebinding before it serves again.
    fn keep_setting_changes(&mut self, be: &mut PooledBackend) {
        let mut ops = std::mem::take(&mut self.pending_ops);
        if !self.tx_failed && !ops.is_empty() {
            // The tier's own setting is the tenant's, not the client's: a change
            // lasts to the end of its transaction, and the connection gets the
            // pinned value back (RESET ALL) before it serves another one.
            let pinned = pinned_setting(self.pool.tenant().tier);
            if self.pool.row().is_some() && ops.iter().any(clears_row_context) {
                // Reset and bound anew before the next transaction.
                be.bound = None;
            }
            let n = ops.len();
            ops.retain(
                |op| !matches!(op, SettingOp::Set { name, .. } if Some(name.as_str()) == pinned),
            );
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
    }
}
