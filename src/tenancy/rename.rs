//! `tenant rename-objects`: gives a tenant made before opaque names (`tenancy::naming`) the
//! names `tenant create` gives today, on its server and in the registry.
//!
//! Each step checks what is there first (the old name, the new one), so a rename killed at any
//! point is finished by running it again. The tenant is suspended meanwhile: PostgreSQL renames
//! a database only when nobody is connected to it, and a session pinned to the old schema name
//! would lose its tables.

use std::time::Duration;

use tokio_postgres::error::SqlState;
use tokio_postgres::Client;

use crate::config::{TenantStatus, Tier};
use crate::pg_error::describe_pg_error;
use crate::tenancy::tier::quote_ident;

use super::naming::{app_role, ddl_role_for, shared_row_role};
use super::provision::{admin_client, exists, role_of, Catalog, ProvisionError};
use super::store::RegistryStore;

/// One object renamed (or found renamed): what kind, from, to.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Renamed {
    pub kind: &'static str,
    pub from: String,
    pub to: String,
}

/// What a rename did to one tenant. Empty when its names were opaque already.
#[derive(Debug, Clone, serde::Serialize)]
pub struct RenameReport {
    pub tenant: String,
    pub renamed: Vec<Renamed>,
    /// It was suspended before the rename and stays so.
    pub left_suspended: bool,
}

/// Renames tenant `id`'s database (database tier), schema (schema tier) and own login roles
/// to their opaque names, then records the new names in the registry.
pub async fn rename_objects(
    store: &RegistryStore,
    id: &str,
) -> Result<RenameReport, ProvisionError> {
    let t = store.tenant(id).await?;
    if !t.provisioned {
        return Err(ProvisionError::Invalid(format!(
            "tenant \"{id}\" is not fully created: run `tenant create` for it again first"
        )));
    }
    let tier = Tier::parse(&t.tier).unwrap_or(Tier::Database);
    let plan = plan(
        store,
        tier,
        &t.id,
        &t.server,
        &t.database,
        t.schema.as_deref(),
    )
    .await?;
    let mut report = RenameReport {
        tenant: id.to_string(),
        renamed: plan.clone(),
        left_suspended: t.status != TenantStatus::Active.as_str(),
    };
    if plan.is_empty() {
        return Ok(report);
    }
    let was_active = !report.left_suspended;
    if was_active {
        store.set_status(id, TenantStatus::Suspended, true).await?;
    }
    rename_on_server(store, &t.server, &t.database, &plan).await?;
    let database = renamed(&plan, "database").unwrap_or(&t.database);
    let schema = renamed(&plan, "schema").or(t.schema.as_deref());
    let roles: Vec<(String, String)> = plan
        .iter()
        .filter(|r| r.kind.ends_with("role"))
        .map(|r| (r.from.clone(), r.to.clone()))
        .collect();
    store.rename_objects(id, database, schema, &roles).await?;
    if was_active {
        store.set_status(id, TenantStatus::Active, false).await?;
    }
    report.renamed = plan;
    Ok(report)
}

fn renamed<'a>(plan: &'a [Renamed], kind: &str) -> Option<&'a str> {
    plan.iter().find(|r| r.kind == kind).map(|r| r.to.as_str())
}

/// Which of the tenant's objects need a new name. Shared objects keep theirs: the schema and
/// row tiers' databases, and the row role all row tenants of a database share.
async fn plan(
    store: &RegistryStore,
    tier: Tier,
    id: &str,
    server: &str,
    database: &str,
    schema: Option<&str>,
) -> Result<Vec<Renamed>, ProvisionError> {
    // The names `tenant create` gives: the stem for the database or schema, `<stem>_app` for
    // the tenant's own role (a row tenant from before roles were shared has one too).
    let stem = store.naming_key().await?.stem(id);
    let mut plan = Vec::new();
    let mut add = |kind, from: &str, to: &str| {
        if from != to {
            plan.push(Renamed {
                kind,
                from: from.to_string(),
                to: to.to_string(),
            });
        }
    };
    match (tier, schema) {
        (Tier::Database, _) => add("database", database, &stem),
        (Tier::Schema, Some(s)) => add("schema", s, &stem),
        _ => {}
    }
    let role = role_of(store, id).await?;
    let own_role = role != shared_row_role(database)
        && store.role_holders(server, &role, id).await?.is_empty();
    if own_role {
        let stem_role = app_role(&stem);
        add("role", &role, &stem_role);
        let ddl = ddl_role_for(&role);
        if store.role_password(id, &ddl).await?.is_some() {
            add("ddl role", &ddl, &ddl_role_for(&stem_role));
        }
    }
    Ok(plan)
}

/// The renames on the server, each done unless done already.
async fn rename_on_server(
    store: &RegistryStore,
    server: &str,
    database: &str,
    plan: &[Renamed],
) -> Result<(), ProvisionError> {
    let err = |e: tokio_postgres::Error| ProvisionError::Server {
        server: server.to_string(),
        message: describe_pg_error(&e),
    };
    let admin = admin_client(store, server, "postgres").await?;
    for r in plan {
        match r.kind {
            "database" => rename_database(&admin, &r.from, &r.to).await.map_err(err)?,
            "schema" => {
                let db = admin_client(store, server, database).await?;
                rename_object(&db, "SCHEMA", &r.from, &r.to)
                    .await
                    .map_err(err)?;
            }
            _ => rename_object(&admin, "ROLE", &r.from, &r.to)
                .await
                .map_err(err)?,
        }
    }
    Ok(())
}

/// PostgreSQL renames a database nobody is connected to: new connections are shut out, the
/// ones there ended (pools reconnect in between, so a few tries), and connections are let in
/// again under the new name.
async fn rename_database(
    admin: &Client,
    from: &str,
    to: &str,
) -> Result<(), tokio_postgres::Error> {
    let (f, t) = (quote_ident(from), quote_ident(to));
    if exists(admin, Catalog::Databases, from).await?
        && !exists(admin, Catalog::Databases, to).await?
    {
        admin
            .batch_execute(&format!("ALTER DATABASE {f} ALLOW_CONNECTIONS false"))
            .await?;
        let mut tries = 0;
        loop {
            admin
                .execute(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = $1",
                    &[&from],
                )
                .await?;
            match admin
                .batch_execute(&format!("ALTER DATABASE {f} RENAME TO {t}"))
                .await
            {
                Ok(()) => break,
                Err(e) if e.code() == Some(&SqlState::OBJECT_IN_USE) && tries < 20 => {
                    tries += 1;
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(e) => return Err(e),
            }
        }
    }
    admin
        .batch_execute(&format!("ALTER DATABASE {t} ALLOW_CONNECTIONS true"))
        .await
}

/// `ALTER <kind> from RENAME TO to`, unless it was done before.
async fn rename_object(
    db: &Client,
    kind: &str,
    from: &str,
    to: &str,
) -> Result<(), tokio_postgres::Error> {
    let catalog = match kind {
        "SCHEMA" => Catalog::Schemas,
        _ => Catalog::Roles,
    };
    if exists(db, catalog, from).await? && !exists(db, catalog, to).await? {
        db.batch_execute(&format!(
            "ALTER {kind} {} RENAME TO {}",
            quote_ident(from),
            quote_ident(to)
        ))
        .await?;
    }
    Ok(())
}
