//! A lost server connection: every request still waiting fails with the server's reason, the
//! client keeps its connection where it can, and its open transaction stays aborted.

use super::*;

impl Engine {
    /// The linked server connection died (killed, server restarted or gone) with the client's
    /// requests in flight. Every request still waiting for its ReadyForQuery fails with the
    /// server's reason (or 08006); a transaction block the client had open stays open but
    /// aborted, as PostgreSQL leaves a failed one, so its later statements cannot run outside
    /// it. The next transaction gets a fresh connection.
    pub(super) async fn recover_from_lost_server(
        &mut self,
        client: &mut ClientStream,
    ) -> Result<(), ()> {
        self.batch_now = None;
        self.discard_lost_backend();
        let report = self.lost_server_report();
        let in_block = self.tx_status != b'I' || self.began_in_batch;
        let status = if in_block { b'E' } else { b'I' };
        self.answer_waiting_requests(report, status);
        self.pipe.reset();
        self.out.clear();
        self.unsynced = false;
        self.pending_ops.clear();
        self.unseen_changes = false;
        self.tx_failed = false;
        self.read_hint = false;
        self.began_in_batch = false;
        self.tx_status = status;
        self.aborted_block = in_block;
        if send_all(client, &self.obuf).await.is_err() {
            return Err(());
        }
        self.bytes_out += self.obuf.len() as u64;
        self.obuf.clear();
        Ok(())
    }

    /// The dead connection goes back to be discarded, and its server's health is checked.
    fn discard_lost_backend(&mut self) {
        if let Some(mut be) = self.backend.take() {
            self.cancel.unlink();
            self.note_release();
            be.mark_broken();
            let pool = self.serving.take().unwrap_or_else(|| self.pool.clone());
            tracing::warn!(tenant = %self.pool.tenant().id, server = %be.server().name, "server connection lost mid-request; the client was told and keeps its connection");
            pool.health().wake_checker();
            pool.discard(be);
        }
    }

    /// The server's own reason (a FATAL it sent before closing), or 08006.
    fn lost_server_report(&mut self) -> ErrorReport {
        let report = self.server_fatal.take().map(|r| *r).unwrap_or_else(|| {
            ErrorReport::error(
                sqlstate::CONNECTION_FAILURE,
                "server connection lost: the server closed the connection unexpectedly",
            )
        });
        report.with_detail(
            "pgtenant lost its connection to the server while this request ran; the client connection is still usable",
        ).with_hint("anything not confirmed committed was not, or may not have been: retry it")
    }

    /// Every request still waiting for its ReadyForQuery gets `report` and one with `status`,
    /// after whatever of the server's output was already forwarded.
    fn answer_waiting_requests(&mut self, report: ErrorReport, status: u8) {
        let waiting = self.unsynced || self.pipe.client_waiting();
        if !waiting {
            // Idle in its transaction: told with its next request (an ErrorResponse now would
            // answer nothing it asked).
            self.pipe.queue.clear();
            self.deferred_error = Some(Box::new(report));
            return;
        }
        let b = &mut self.obuf;
        let mut answered = false;
        for item in self.pipe.queue.drain(..) {
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
    }
}

/// The error a server sends before closing a connection (FATAL or PANIC), as a report of
/// ERROR severity with the server's code and message.
pub(super) fn fatal_report(body: &[u8]) -> Option<ErrorReport> {
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
