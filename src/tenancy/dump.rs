//! `tenant dump`: a backup of one tenant's data that psql restores.
//!
//! Database and schema tiers are pg_dump's own output (the database, or `--schema`). pg_dump
//! cannot filter rows, so for the row tier pgtenant writes what `pg_dump --data-only` would for
//! the shared tables, restricted to the tenant's rows, from one consistent snapshot.

use std::io::Write;
use std::path::PathBuf;
use std::process::Command;

use futures_util::{pin_mut, TryStreamExt};

use crate::config::Tier;
use crate::tenancy::tier::{quote_ident, quote_literal};

use super::provision::{admin_client, tenant_tables, ProvisionError};
use super::store::RegistryStore;

/// Writes tenant `id`'s export to `out`.
pub async fn dump(
    store: &RegistryStore,
    id: &str,
    out: &mut (dyn Write + Send),
) -> Result<(), ProvisionError> {
    let t = store.tenant(id).await?;
    let tier = Tier::parse(&t.tier).unwrap_or(Tier::Database);
    let io = |e: std::io::Error| ProvisionError::Invalid(format!("cannot write the dump: {e}"));
    match tier {
        Tier::Database | Tier::Schema => {
            let (server, password) = store.server_admin(&t.server).await?;
            let mut cmd = Command::new(pg_dump_path());
            cmd.args(["--no-owner", "--no-privileges", "--host"])
                .arg(&server.host)
                .arg("--port")
                .arg(server.port.to_string())
                .arg("--username")
                .arg(&server.admin_user)
                .arg("--dbname")
                .arg(&t.database);
            if let (Tier::Schema, Some(s)) = (tier, &t.schema) {
                cmd.arg("--schema").arg(s);
            }
            if let Some(p) = password {
                // The child's environment, not its command line, so `ps` never shows it.
                cmd.env("PGPASSWORD", p.expose());
            }
            let output = tokio::task::spawn_blocking(move || cmd.output())
                .await
                .map_err(|e| ProvisionError::Invalid(e.to_string()))?
                .map_err(|e| ProvisionError::Invalid(format!("cannot run pg_dump: {e}")))?;
            if !output.status.success() {
                return Err(ProvisionError::Invalid(format!(
                    "pg_dump failed: {}",
                    String::from_utf8_lossy(&output.stderr).trim()
                )));
            }
            out.write_all(&output.stdout).map_err(io)?;
        }
        Tier::Row => {
            let mut db = admin_client(store, &t.server, &t.database).await?;
            let e = |e: tokio_postgres::Error| ProvisionError::Server {
                server: t.server.clone(),
                message: crate::pg_error::describe_pg_error(&e),
            };
            let tx = db
                .build_transaction()
                .isolation_level(tokio_postgres::IsolationLevel::RepeatableRead)
                .read_only(true)
                .start()
                .await
                .map_err(e)?;
            writeln!(
                out,
                "--\n-- pgtenant dump of row-tier tenant {id} (database {db}): its rows only\n--\n\n\
                 SET client_encoding = 'UTF8';\nSET standard_conforming_strings = on;\n\
                 SELECT pg_catalog.set_config('search_path', '', false);\n",
                db = t.database
            )
            .map_err(io)?;
            for table in tenant_tables(&tx).await.map_err(e)? {
                let cols = columns(&tx, &table).await.map_err(e)?;
                let col_list = cols
                    .iter()
                    .map(|c| quote_ident(c))
                    .collect::<Vec<_>>()
                    .join(", ");
                let q = format!("public.{}", quote_ident(&table));
                writeln!(
                    out,
                    "--\n-- Data for {q}\n--\n\nCOPY {q} ({col_list}) FROM stdin;"
                )
                .map_err(io)?;
                let stream = tx
                    .copy_out(&format!(
                        "COPY (SELECT {col_list} FROM {q} WHERE tenant_id = {}) TO STDOUT",
                        quote_literal(id)
                    ))
                    .await
                    .map_err(e)?;
                pin_mut!(stream);
                while let Some(chunk) = stream.try_next().await.map_err(e)? {
                    out.write_all(&chunk).map_err(io)?;
                }
                writeln!(out, "\\.\n").map_err(io)?;
            }
            tx.commit().await.map_err(e)?;
        }
    }
    Ok(())
}

async fn columns(
    db: &impl tokio_postgres::GenericClient,
    table: &str,
) -> Result<Vec<String>, tokio_postgres::Error> {
    Ok(db
        .query(
            "SELECT attname FROM pg_attribute
             WHERE attrelid = ('public.' || quote_ident($1))::regclass AND attnum > 0
               AND NOT attisdropped AND attgenerated = ''
             ORDER BY attnum",
            &[&table],
        )
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect())
}

/// pg_dump from PATH, else beside the server binaries pgtenant finds for throwaway clusters.
fn pg_dump_path() -> PathBuf {
    if let Some(dir) = crate::cluster::find_bindir() {
        let p = dir.join("pg_dump");
        if p.exists() {
            return p;
        }
    }
    PathBuf::from("pg_dump")
}
