//! The accept loop.

use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tracing::warn;

use crate::context::ProxyContext;

use super::session;

/// Accepts clients until `shutdown` resolves; each client runs in its own task, so a slow or
/// broken client never holds up another.
pub async fn accept_loop(
    listener: TcpListener,
    ctx: Arc<ProxyContext>,
    shutdown: impl std::future::Future<Output = ()>,
) {
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            _ = &mut shutdown => return,
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => match ctx.pending.enter() {
                    Some(login) => {
                        tokio::spawn(session::run(stream, peer, ctx.clone(), login));
                    }
                    None => {
                        tokio::spawn(session::refuse_busy(stream, peer, ctx.pending.max()));
                    }
                },
                Err(e) => {
                    // Typically EMFILE: back off briefly instead of spinning.
                    warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
        }
    }
}
