//! Borrowing a backend for a transaction (the primary's or a replica's), bringing it in line
//! with the client (`super::super::prelude`), and counting the transaction when it is let go.

use super::*;

impl Engine {
    /// `link`, except that a request no server connection can be found for (the server is
    /// down, the pool busy, no replica usable) fails alone: the client is told, as PostgreSQL
    /// would tell it of a failed statement, and may try again. False when refused so.
    pub(super) async fn link_or_refuse(&mut self, tag: u8) -> Result<bool, TxEnd> {
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
                    self.pipe.synthesize(b.freeze());
                } else {
                    self.refuse_extended(report);
                }
                Ok(false)
            }
        }
    }

    /// A backend for a read: from a usable replica (round robin; one that fails to connect
    /// is passed over at once), else from the primary if the session allows it.
    pub(super) async fn checkout_read(
        &mut self,
        liveness: Liveness,
    ) -> Result<Box<PooledBackend>, PoolError> {
        let mut last = None;
        if let Some(replicas) = self.pool.replicas().cloned() {
            for p in replicas.candidates() {
                let p = p.clone();
                match p.checkout_with(Patience::FailFast, liveness).await {
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
        self.pool
            .checkout_with(Patience::UntilTimeout, liveness)
            .await
    }

    /// A backend from the tenant's current pool: a replica's for a read, else the primary's.
    pub(super) async fn checkout_any(
        &mut self,
        read: bool,
        liveness: Liveness,
    ) -> Result<Box<PooledBackend>, TxEnd> {
        loop {
            if self.pool.is_retired() {
                // The tenant's entry changed: continue on the pool built from it.
                self.pool = self.pool.current().ok_or_else(|| {
                    TxEnd::Pool(PoolError::Removed(self.pool.tenant().id.clone()))
                })?;
            }
            let checkout = if read {
                // Boxed: the replicas' round has its own state, which a write need not carry.
                Box::pin(self.checkout_read(liveness)).await
            } else {
                self.pool
                    .checkout_with(Patience::UntilTimeout, liveness)
                    .await
            };
            match checkout {
                Err(PoolError::Retired) => continue,
                other => return other.map_err(TxEnd::Pool),
            }
        }
    }

    /// Counts the transaction the linked backend served, as it is let go.
    pub(super) fn note_release(&mut self) {
        self.count_transaction();
        if std::mem::take(&mut self.active_counted) {
            self.pool.stats().active.dec();
        }
    }

    /// Counts the transaction that just ended (or the open one, on release).
    pub(super) fn count_transaction(&mut self) {
        if let Some(at) = self.tx_began.take() {
            let took = self.now().saturating_duration_since(at);
            if self.limits.slow().is_some_and(|s| took > s) {
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

    /// Pipelines what `be` needs before the client's messages (`prelude`), responses
    /// swallowed. On an error nothing is queued, and the connection is not to be used.
    fn put_prelude(&mut self, be: &mut PooledBackend) -> Result<(), crate::backend::BackendError> {
        let (out_len, queue_len) = (self.out.len(), self.pipe.queue.len());
        let tenant = self.pool.tenant();
        let plan = crate::frontend::prelude::prelude(
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
            self.pipe.expect_proxy(Resp::Query);
        }
        if let Some(sql) = &plan.settings {
            // In a query of its own: one that fails must not roll the reset back.
            put_query(&mut self.out, sql);
            self.pipe.expect_proxy(Resp::Query);
        }
        if plan.reset || plan.settings.is_some() {
            be.applied_settings = self.state.script().clone();
        }
        if let (true, Some(row)) = (plan.bind, self.pool.row()) {
            if let Err(e) = be.put_row_bind(&mut self.out, &row.tenant) {
                self.out.truncate(out_len);
                self.pipe.queue.truncate(queue_len);
                return Err(e);
            }
            for r in [
                Resp::Parse(None),
                Resp::Bind,
                Resp::RowBind(row.tenant.clone()),
                Resp::Sync,
            ] {
                self.pipe.expect_proxy(r);
            }
        }
        if let (true, Some(sql)) = (plan.caps, &tenant.enforce_limits) {
            // Whatever the last transaction raised, also through set_config().
            put_query(&mut self.out, sql);
            self.pipe.expect_proxy(Resp::Query);
        }
        Ok(())
    }

    /// Borrows a backend for the transaction that is starting, and brings it in line with the
    /// client's session (settings); statements are prepared as they are used.
    pub(super) async fn link(&mut self) -> Result<(), TxEnd> {
        if self.backend.is_some() {
            return Ok(());
        }
        let read = self.reads.all_reads || std::mem::take(&mut self.read_hint);
        let liveness = if std::mem::take(&mut self.woken_for_request) {
            Liveness::AfterWake
        } else {
            Liveness::Peek
        };
        // The common case, a parked connection of the primary's pool at once, takes no
        // future: the checkout's own would be built, moved and polled on every transaction.
        let parked = if read || self.pool.is_retired() {
            None
        } else {
            self.pool.try_checkout(liveness)
        };
        let mut be = match parked {
            Some(be) => {
                self.pool.stats().wait_seconds.observe(0.0);
                be
            }
            None => Box::pin(self.checkout_waiting(read, liveness)).await?,
        };
        let now = self.now();
        self.pool.stats().active.inc();
        self.active_counted = true;
        self.tx_began = Some(now);
        if let Err(e) = self.put_prelude(&mut be) {
            self.pool.discard(be);
            return Err(TxEnd::Pool(PoolError::Backend(e)));
        }
        if std::mem::take(&mut self.aborted_block) {
            put_query(&mut self.out, &abort_statement());
            self.pipe.expect_proxy(Resp::Abort);
        }
        self.cancel.link(be.cancel_target());
        self.tx_status = be.tx_status();
        self.backend = Some(be);
        Ok(())
    }

    /// A backend from the tenant's current pool (a replica's for a read), however long it
    /// takes, counted as a wait.
    async fn checkout_waiting(
        &mut self,
        read: bool,
        liveness: Liveness,
    ) -> Result<Box<PooledBackend>, TxEnd> {
        let waited = self.now();
        // The counters are per (tenant, role), the same whichever pool serves it.
        self.pool.stats().waiting.inc();
        // A client that has to wait for a connection (a busy pool, a full server budget) holds
        // no empty buffers meanwhile: thousands may wait at once.
        let mut out = std::mem::take(&mut self.out);
        let mut obuf = std::mem::take(&mut self.obuf);
        let mut waited_for_it = false;
        let got = {
            let mut checkout = std::pin::pin!(self.checkout_any(read, liveness));
            match futures_util::poll!(checkout.as_mut()) {
                std::task::Poll::Ready(r) => r,
                std::task::Poll::Pending => {
                    waited_for_it = true;
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
        if waited_for_it {
            self.batch_now = None;
        }
        let now = self.now();
        let stats = self.pool.stats();
        stats.waiting.dec();
        let be = got?;
        stats
            .wait_seconds
            .observe(now.saturating_duration_since(waited).as_secs_f64());
        Ok(be)
    }
}

/// Opens a transaction and fails it: what a client whose transaction was lost with its server
/// connection finds its next statements in (see `Resp::Abort`).
pub(super) fn abort_statement() -> String {
    let report = ErrorReport::error(
        sqlstate::IN_FAILED_TRANSACTION,
        "the transaction was aborted when its server connection was lost",
    );
    format!("BEGIN; {}", raise_statement(&report))
}
