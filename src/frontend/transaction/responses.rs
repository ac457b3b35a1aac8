//! What the engine applies of each server message: `pipeline` decides what is forwarded or
//! swallowed and reports what it learned (ReadyForQuery, command tags, parameter status, a
//! FATAL before the server closes); here that reaches the connection, the pool's statistics and
//! the client's session.

use super::pipeline::{consume, Effects, Ready};
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

    /// Feeds the server's output to the pipeline, which appends what the client gets to the
    /// client buffer; the pipeline, the buffers and the engine are borrowed apart for it (moves
    /// of a few words, no copies).
    pub(super) fn scan_server(&mut self, be: &mut PooledBackend) -> Result<(), TxEnd> {
        let mut pipe = std::mem::take(&mut self.pipe);
        let mut out = std::mem::take(&mut self.obuf);
        let input = std::mem::take(&mut be.read_buf);
        let scanned = pipe.scan(&input, &mut out, &mut Apply { eng: self, be });
        self.pipe = pipe;
        self.obuf = out;
        be.read_buf = input;
        match scanned {
            Ok(s) => {
                consume(&mut be.read_buf, s);
                Ok(())
            }
            Err(e) => {
                tracing::error!(tenant = %self.pool.tenant().id, server = %be.server().name, error = %e, "server connection out of step with its client; closing it");
                be.mark_broken();
                Err(TxEnd::ServerGone)
            }
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

/// The engine and the linked connection, as the pipeline's effects land on them.
struct Apply<'a> {
    eng: &'a mut Engine,
    be: &'a mut PooledBackend,
}

impl Effects for Apply<'_> {
    fn parameter_status(&mut self, name: &[u8], value: &[u8]) {
        self.be.set_param(
            String::from_utf8_lossy(name).into_owned(),
            String::from_utf8_lossy(value).into_owned(),
        );
    }

    fn server_fatal(&mut self, report: ErrorReport) {
        // The server is closing this connection; the client is told when it does, as an
        // ERROR, for its own connection stays.
        self.be.mark_broken();
        self.eng.server_fatal = Some(Box::new(report));
    }

    fn parsed(&mut self, name: &Arc<str>) {
        self.eng.pool.mark_parsed(name);
    }

    fn unprepared(&mut self, name: &Arc<str>) {
        self.be.prepared.remove(name);
    }

    fn client_error(&mut self, body: Option<&[u8]>) {
        self.eng.tx_failed = true;
        if let Some(code) = body.and_then(crate::protocol::report::sqlstate_of) {
            self.eng.pool.stats().error(code);
        }
    }

    fn replay_failed(&mut self) {
        tracing::warn!("replaying client settings failed on a server connection");
        self.be.applied_settings = Arc::from("\0failed");
    }

    fn binding_failed(&mut self) {
        tracing::warn!("row-tier binding of a server connection failed");
    }

    /// A request is complete; at the end of a transaction, the client's setting changes are
    /// kept (the tier's pin and a cleared row context excepted).
    fn ready(&mut self, r: Ready) {
        let (eng, be) = (&mut *self.eng, &mut *self.be);
        be.tx_status = r.status;
        if !r.client {
            return;
        }
        if let Some(at) = eng.request_at.take() {
            let now = eng.now();
            eng.pool
                .stats()
                .query_seconds
                .observe(now.saturating_duration_since(at).as_secs_f64());
            if r.more_replies {
                eng.request_at = Some(now);
            }
        }
        eng.tx_status = r.status;
        eng.began_in_batch = false;
        if r.status != b'I' {
            return;
        }
        // A transaction ended while the link goes on (more requests pipelined behind it, or a
        // pinned client): counted now, one by one.
        if r.more_requests || eng.pinned {
            eng.count_transaction();
            if r.more_requests {
                eng.tx_began = Some(eng.now());
            }
        }
        eng.keep_setting_changes(be);
        eng.tx_failed = false;
        if eng.unpin_requested && r.idle {
            tracing::info!(tenant = %eng.pool.tenant().id, "client unpinned by DISCARD ALL");
            eng.unpin();
        }
    }

    /// What a client's command changed of the session (DISCARD, DEALLOCATE ALL, ROLLBACK, BEGIN).
    fn command_done(&mut self, tag: &[u8]) {
        let (eng, be) = (&mut *self.eng, &mut *self.be);
        match tag {
            b"DISCARD ALL" => {
                be.bound = None;
                be.prepared.clear();
                eng.state.statements.clear();
                be.applied_settings = Arc::from("");
            }
            b"DEALLOCATE ALL" => {
                be.prepared.clear();
                eng.state.statements.clear();
            }
            b"ROLLBACK" => eng.tx_failed = true,
            b"BEGIN" | b"START TRANSACTION" => eng.began_in_batch = true,
            // A DISCARD of the client's cleared the row context: bound again before the next
            // transaction.
            t if t.starts_with(b"DISCARD") && eng.pool.row().is_some() => be.bound = None,
            _ => {}
        }
    }

    fn row_bound(&mut self, tenant: &Arc<str>, accepted: bool) {
        if accepted {
            self.be.bound = Some(tenant.clone());
        } else {
            // The client's statements ran bound to no one; this connection is not to be
            // trusted with another.
            tracing::error!(tenant = %tenant, "server refused the row-tier binding of a connection; closing it");
            self.be.broken = true;
        }
    }
}
