//! The admin console: database `pgtenant` on the proxy's own port, for the admin users of the
//! config, spoken to with plain psql (simple queries). Its SHOW commands keep PgBouncer's
//! column names and order where they mean the same, with tenant columns added at the end.

pub mod command;
pub mod metrics;
mod resultset;
mod show;
pub mod usage;

use crate::clients::stream::ClientStream;
use bytes::BytesMut;
use pgwire::messages::startup::ParameterStatus;
use pgwire::messages::Message;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::context::ProxyContext;
use crate::protocol::framing::{cstr, HEADER_LEN};
use crate::protocol::{messages, sqlstate, ErrorReport};

pub use command::{parse, Command, CommandError};
use resultset::command_complete;

/// Largest console message: commands are short.
const MAX_MESSAGE: usize = 64 * 1024;

/// Serves one admin session until the client leaves.
pub async fn serve(client: &mut ClientStream, ctx: &ProxyContext, user: &str) {
    let mut out = BytesMut::new();
    for (k, v) in [
        (
            "server_version",
            concat!("15.0 (pgtenant ", env!("CARGO_PKG_VERSION"), ")"),
        ),
        ("server_encoding", "UTF8"),
        ("client_encoding", "UTF8"),
        ("DateStyle", "ISO, MDY"),
        ("integer_datetimes", "on"),
        ("standard_conforming_strings", "on"),
        ("application_name", ""),
    ] {
        let _ = ParameterStatus::new(k.into(), v.into()).encode(&mut out);
    }
    messages::backend_key_data(&mut out, 0, 0);
    messages::ready_for_query_idle(&mut out);
    if client.write_all(&out).await.is_err() {
        return;
    }
    let mut buf = BytesMut::with_capacity(1024);
    // After a refused extended-protocol message, skip to the Sync.
    let mut skipping = false;
    loop {
        while buf.len() >= HEADER_LEN {
            let tag = buf[0];
            let len = u32::from_be_bytes([buf[1], buf[2], buf[3], buf[4]]) as usize;
            if !(4..=MAX_MESSAGE).contains(&len) {
                let mut out = BytesMut::new();
                ErrorReport::fatal(sqlstate::PROTOCOL_VIOLATION, "invalid message length")
                    .encode(&mut out);
                let _ = client.write_all(&out).await;
                return;
            }
            if buf.len() < len + 1 {
                break;
            }
            let msg = buf.split_to(len + 1);
            let body = &msg[HEADER_LEN..];
            let mut out = BytesMut::new();
            match tag {
                b'X' => return,
                b'Q' => {
                    let sql = cstr(body)
                        .map(|(t, _)| String::from_utf8_lossy(t).into_owned())
                        .unwrap_or_default();
                    run(ctx, user, &sql, &mut out).await;
                    messages::ready_for_query_idle(&mut out);
                }
                b'S' => {
                    skipping = false;
                    messages::ready_for_query_idle(&mut out);
                }
                _ if skipping => {}
                _ => {
                    ErrorReport::error(
                        sqlstate::FEATURE_NOT_SUPPORTED,
                        "the admin console accepts simple queries only (psql, or simple_query)",
                    )
                    .encode(&mut out);
                    skipping = true;
                }
            }
            if !out.is_empty() && client.write_all(&out).await.is_err() {
                return;
            }
        }
        if buf.capacity() - buf.len() < 512 {
            buf.reserve(4096);
        }
        match client.read_buf(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
    }
}

/// Runs one command and writes its result (or error) to `out`.
async fn run(ctx: &ProxyContext, user: &str, sql: &str, out: &mut BytesMut) {
    if sql.trim().trim_end_matches(';').trim().is_empty() {
        let _ = pgwire::messages::response::EmptyQueryResponse::new().encode(out);
        return;
    }
    let cmd = match parse(sql) {
        Ok(c) => c,
        Err(e) => {
            ErrorReport::error("42601", e.to_string()).encode(out);
            return;
        }
    };
    tracing::info!(user = %user, command = %sql.trim(), "admin command");
    match cmd {
        Command::Show(what) => match show::show(ctx, &what) {
            Some(rs) => rs.encode(out),
            None => ErrorReport::error(
                "42601",
                format!("unknown SHOW item \"{what}\" (try SHOW HELP)"),
            )
            .encode(out),
        },
        Command::Pause(tenant) => {
            if let Some(e) = unknown_tenant(ctx, tenant.as_deref()) {
                return e.encode(out);
            }
            ctx.pools.pauses().pause(tenant.as_deref());
            // Returns once the paused tenants' running transactions are done.
            while busy(ctx, tenant.as_deref()) > 0 {
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            }
            command_complete(out, "PAUSE");
        }
        Command::Resume(tenant) => {
            ctx.pools.pauses().resume(tenant.as_deref());
            command_complete(out, "RESUME");
        }
        Command::Reload => match ctx.reload_from_file() {
            Ok(_) => command_complete(out, "RELOAD"),
            Err(e) => ErrorReport::error(sqlstate::OBJECT_NOT_IN_PREREQUISITE_STATE, e.to_string())
                .encode(out),
        },
        Command::Kill(tenant) => {
            if let Some(e) = unknown_tenant(ctx, Some(&tenant)) {
                return e.encode(out);
            }
            let reason = format!(
                "terminating connection: tenant \"{tenant}\" was killed by an administrator"
            );
            let n = ctx.cancels.terminate_tenant(&tenant, &reason);
            ctx.pools.close_tenant(&tenant);
            tracing::warn!(tenant = %tenant, sessions = n, "tenant killed from the admin console");
            command_complete(out, "KILL");
        }
        Command::Shutdown => {
            ctx.request_shutdown();
            command_complete(out, "SHUTDOWN");
        }
    }
}

fn unknown_tenant(ctx: &ProxyContext, tenant: Option<&str>) -> Option<ErrorReport> {
    let t = tenant?;
    ctx.registry.tenant(t).is_none().then(|| {
        ErrorReport::error(
            sqlstate::INVALID_CATALOG_NAME,
            format!("tenant \"{t}\" does not exist"),
        )
    })
}

/// Server connections the tenant's (or every tenant's) clients hold now.
fn busy(ctx: &ProxyContext, tenant: Option<&str>) -> usize {
    ctx.pools
        .all_stats()
        .iter()
        .filter(|(k, _)| tenant.is_none_or(|t| &*k.tenant == t))
        .map(|(_, s)| s.snapshot().active)
        .sum()
}
