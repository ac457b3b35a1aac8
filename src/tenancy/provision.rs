//! Creating and deleting tenants for real: databases, schemas, row-tier registration, login
//! roles with least privilege, migrations, and the registry entry.
//!
//! Every step is idempotent and the registry row says "not provisioned" until the last one, so
//! a create killed at any point is completed by running it again, and a delete killed at any
//! point is finished the same way.

use std::collections::BTreeMap;

use rand::distributions::Alphanumeric;
use rand::Rng;
use tokio_postgres::Client;

use crate::config::{validate, TenantStatus, Tier};
use crate::pg_error::describe_pg_error;
use crate::tenancy::row_context;
use crate::tenancy::tier::{quote_ident, quote_literal};

use super::migrate::{self, MigrateError, Migration, Place, HISTORY_TABLE};
use super::naming::{ddl_role_for, ObjectNames};
use super::store::{RegistryError, RegistryStore, TenantRecord, TenantSettings};

/// Table in each shared row-tier database listing the tenants registered there.
pub const ROW_TENANTS_TABLE: &str = "pgtenant_tenants";
/// Name of the RLS policy pgtenant puts on every row-tier table with a `tenant_id` column.
pub const ROW_POLICY: &str = "pgtenant_tenant_isolation";

#[derive(Debug, thiserror::Error)]
pub enum ProvisionError {
    #[error(transparent)]
    Registry(#[from] RegistryError),
    #[error(transparent)]
    Migrate(#[from] MigrateError),
    #[error("on server \"{server}\": {message}")]
    Server { server: String, message: String },
    #[error("{0}")]
    Invalid(String),
    #[error("tenant \"{0}\" already exists")]
    Exists(String),
}

/// What `tenant create` needs to know.
#[derive(Debug, Clone)]
pub struct CreateRequest {
    pub id: String,
    pub tier: Tier,
    /// None: the only registered server.
    pub server: Option<String>,
    pub settings: TenantSettings,
    /// Client users: (name, SCRAM verifier).
    pub users: Vec<(String, String)>,
}

pub fn random_password() -> String {
    rand::thread_rng()
        .sample_iter(&Alphanumeric)
        .take(32)
        .map(char::from)
        .collect()
}

/// Test hook: `PGTENANT_CRASH_AFTER=<step>` kills the process (SIGKILL, no cleanup) right
/// after that step, to prove a retry completes what a crash left.
fn crash_point(step: &str) {
    if std::env::var("PGTENANT_CRASH_AFTER").is_ok_and(|s| s == step) {
        let _ = nix::sys::signal::raise(nix::sys::signal::Signal::SIGKILL);
    }
}

pub async fn admin_client(
    store: &RegistryStore,
    server: &str,
    database: &str,
) -> Result<Client, ProvisionError> {
    let (s, password) = store.server_admin(server).await?;
    let mut pg = tokio_postgres::Config::new();
    pg.host(&s.host)
        .port(s.port)
        .user(&s.admin_user)
        .dbname(database)
        .application_name("pgtenant provisioning")
        .options("-c client_min_messages=warning")
        .connect_timeout(std::time::Duration::from_secs(10));
    if let Some(p) = &password {
        pg.password(p.expose());
    }
    let tls = crate::tls::BackendTls::build(&s.tls).map_err(|e| ProvisionError::Server {
        server: server.to_string(),
        message: e.to_string(),
    })?;
    let connector = tls.for_tokio_postgres(&mut pg);
    let (client, conn) = pg
        .connect(connector)
        .await
        .map_err(|e| ProvisionError::Server {
            server: server.to_string(),
            message: format!(
                "cannot connect to database \"{database}\": {}",
                describe_pg_error(&e)
            ),
        })?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(client)
}

fn server_err(server: &str) -> impl Fn(tokio_postgres::Error) -> ProvisionError + '_ {
    move |e| ProvisionError::Server {
        server: server.to_string(),
        message: describe_pg_error(&e),
    }
}

/// Creates (or completes the creation of) a tenant. Returns its registry record.
pub async fn create(
    store: &RegistryStore,
    req: &CreateRequest,
    migrations: &[Migration],
) -> Result<TenantRecord, ProvisionError> {
    let id = req.id.as_str();
    if !validate::is_tenant_id(id) || id == validate::ADMIN_DATABASE {
        return Err(ProvisionError::Invalid(format!(
            "\"{id}\" is not a valid tenant id (1-63 of a-z, 0-9, '_', '-', starting with a letter or digit; not \"{}\")",
            validate::ADMIN_DATABASE
        )));
    }
    for (user, _) in &req.users {
        if user.is_empty() || user.contains('\0') {
            return Err(ProvisionError::Invalid(format!(
                "client user \"{user}\" must be non-empty"
            )));
        }
    }
    let server = match &req.server {
        Some(s) => store.server(s).await?.name,
        None => {
            let all = store.servers().await?;
            match all.as_slice() {
                [one] => one.name.clone(),
                [] => {
                    return Err(ProvisionError::Invalid(
                        "no server is registered: add one with `pgtenant server add`".into(),
                    ))
                }
                _ => {
                    return Err(ProvisionError::Invalid(
                        "several servers are registered: choose one with --server".into(),
                    ))
                }
            }
        }
    };
    let names = planned_names(store, req.tier, id).await?;
    if req.tier == Tier::Row && names.role.len() > 63 {
        return Err(ProvisionError::Invalid(format!(
            "row database \"{}\" is too long for its login role: at most 59 characters",
            names.database
        )));
    }
    let ObjectNames {
        database,
        schema,
        role,
    } = names;
    if !store
        .begin_tenant(
            id,
            req.tier,
            &server,
            &database,
            schema.as_deref(),
            &req.settings,
        )
        .await?
    {
        return Err(ProvisionError::Exists(id.to_string()));
    }
    crash_point("registered");

    let admin = admin_client(store, &server, "postgres").await?;
    let err = server_err(&server);
    // Creates that share a row role must agree on its password.
    admin
        .execute(
            "SELECT pg_advisory_lock(hashtext('pgtenant role ' || $1))",
            &[&role],
        )
        .await
        .map_err(&err)?;
    let role_ready = ensure_role(store, &admin, id, &server, &role).await;
    let _ = admin
        .execute(
            "SELECT pg_advisory_unlock(hashtext('pgtenant role ' || $1))",
            &[&role],
        )
        .await;
    role_ready?;
    crash_point("role");

    // Creates of tenants sharing a database must not GRANT on it at the same time.
    admin
        .execute(
            "SELECT pg_advisory_lock(hashtext('pgtenant provision ' || $1))",
            &[&database],
        )
        .await
        .map_err(&err)?;
    let target = Target {
        server: &server,
        database: &database,
        schema: schema.as_deref(),
        role: &role,
    };
    let result = provision_storage(store, &admin, req, &target, migrations).await;
    let _ = admin
        .execute(
            "SELECT pg_advisory_unlock(hashtext('pgtenant provision ' || $1))",
            &[&database],
        )
        .await;
    result?;
    crash_point("migrated");

    for (name, verifier) in &req.users {
        store
            .put_user(id, name, verifier, &role, false, Default::default())
            .await?;
    }
    store.finish_tenant(id).await?;
    Ok(store.tenant(id).await?)
}

/// Gives `role` a password and stores it (sealed) for tenant `id`: the one its other tenants
/// hold if the role is shared, else a new one. Stored before the role gets it: a crash in
/// between only means the retry sets a new one.
async fn ensure_role(
    store: &RegistryStore,
    admin: &Client,
    id: &str,
    server: &str,
    role: &str,
) -> Result<(), ProvisionError> {
    let mut password = None;
    if let Some(other) = store.role_holders(server, role, id).await?.first() {
        password = store
            .role_password(other, role)
            .await?
            .map(|p| p.expose().to_string());
    }
    let password = password.unwrap_or_else(random_password);
    store.put_role(id, role, &password).await?;
    ensure_login_role(admin, role, &password)
        .await
        .map_err(server_err(server))?;
    Ok(())
}

/// Where a tenant being created goes.
struct Target<'a> {
    server: &'a str,
    database: &'a str,
    schema: Option<&'a str>,
    role: &'a str,
}

/// The database or schema or row-tier registration, then migrations and privileges, through
/// the server's admin connection `admin` (on its `postgres` database).
async fn provision_storage(
    store: &RegistryStore,
    admin: &Client,
    req: &CreateRequest,
    target: &Target<'_>,
    migrations: &[Migration],
) -> Result<(), ProvisionError> {
    let Target {
        server,
        database,
        schema,
        role,
    } = *target;
    let id = req.id.as_str();
    let err = server_err(server);
    ensure_database(admin, database).await.map_err(&err)?;
    admin
        .batch_execute(&format!(
            "GRANT CONNECT{temp} ON DATABASE {d} TO {r}",
            temp = if req.tier == Tier::Database {
                ", TEMPORARY"
            } else {
                ""
            },
            d = quote_ident(database),
            r = quote_ident(role)
        ))
        .await
        .map_err(&err)?;
    let mut db = admin_client(store, server, database).await?;
    db.batch_execute("REVOKE CREATE ON SCHEMA public FROM PUBLIC")
        .await
        .map_err(&err)?;
    match req.tier {
        Tier::Database => {}
        Tier::Schema => {
            let s = quote_ident(schema.unwrap_or(id));
            db.batch_execute(&format!("CREATE SCHEMA IF NOT EXISTS {s}"))
                .await
                .map_err(&err)?;
        }
        Tier::Row => {
            db.batch_execute(&format!(
                "CREATE TABLE IF NOT EXISTS public.{ROW_TENANTS_TABLE} (
                     id text PRIMARY KEY, registered_at timestamptz NOT NULL DEFAULT now());
                 INSERT INTO public.{ROW_TENANTS_TABLE} (id) VALUES ({}) ON CONFLICT DO NOTHING",
                quote_literal(id)
            ))
            .await
            .map_err(&err)?;
        }
    }
    crash_point("storage");

    let record = store.tenant(id).await?;
    migrate_one(store, &record, &mut db, migrations).await?;
    Ok(())
}

/// Applies pending migrations for one tenant on an open admin connection to its database,
/// then puts its privileges (and, for the row tier, its RLS policies) in place and records
/// the history in the registry. Returns the versions applied.
pub async fn migrate_one(
    store: &RegistryStore,
    t: &TenantRecord,
    db: &mut Client,
    migrations: &[Migration],
) -> Result<Vec<i64>, ProvisionError> {
    let tier = Tier::parse(&t.tier).ok_or_else(|| {
        ProvisionError::Invalid(format!("tenant \"{}\" has tier \"{}\"", t.id, t.tier))
    })?;
    let place = migrate::place_of(t, tier);
    let err = server_err(&t.server);
    migrate::lock_place(db, &place).await.map_err(&err)?;
    let result = async {
        let applied = migrate::apply(db, &place, migrations).await?;
        if tier == Tier::Row {
            let secret = store.row_secret().await?;
            let open = row_context::install(&*db, &secret.row_key(&t.database))
                .await
                .map_err(&err)?;
            if !open.is_empty() {
                tracing::warn!(
                    database = %t.database,
                    functions = %open.join(", "),
                    "row tenants of this database can read and signal each other's sessions: only a superuser can revoke these from PUBLIC (docs/isolation.md)"
                );
            }
            enforce_row_policies(db).await.map_err(&err)?;
        }
        let role = recorded_role(store, t).await?;
        grant_tenant_role(db, &place, &role, tier)
            .await
            .map_err(&err)?;
        // The DDL role, when the tenant has one, uses the new tables as the tenant's role does.
        let ddl = ddl_role_for(&role);
        if tier != Tier::Row && store.role_password(&t.id, &ddl).await?.is_some() {
            grant_tenant_role(db, &place, &ddl, tier)
                .await
                .map_err(&err)?;
        }
        Ok::<_, ProvisionError>(applied)
    }
    .await;
    migrate::unlock_place(db, &place).await;
    let applied = result?;
    migrate::record(store, &t.id, db, &place).await?;
    Ok(applied)
}

pub(crate) async fn ensure_login_role(
    admin: &Client,
    role: &str,
    password: &str,
) -> Result<(), tokio_postgres::Error> {
    let verb = if exists(admin, Catalog::Roles, role).await? {
        "ALTER"
    } else {
        "CREATE"
    };
    // The server gets a SCRAM verifier, never the password: statement text can end up in the
    // server log (a failed statement is logged) and in pg_stat_activity.
    admin
        .batch_execute(&format!(
            "{verb} ROLE {} LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE NOREPLICATION NOBYPASSRLS PASSWORD {}",
            quote_ident(role),
            quote_literal(&crate::credentials::hash_password(password))
        ))
        .await
}

async fn ensure_database(admin: &Client, database: &str) -> Result<(), tokio_postgres::Error> {
    if !exists(admin, Catalog::Databases, database).await? {
        let d = quote_ident(database);
        // CREATE DATABASE must run alone, outside a transaction block.
        match admin.batch_execute(&format!("CREATE DATABASE {d}")).await {
            Ok(()) => {}
            // Another create made it meanwhile.
            Err(e) if e.code() == Some(&tokio_postgres::error::SqlState::DUPLICATE_DATABASE) => {}
            Err(e) => return Err(e),
        }
        admin
            .batch_execute(&format!("REVOKE ALL ON DATABASE {d} FROM PUBLIC"))
            .await?;
    }
    Ok(())
}

/// Least privilege for the tenant's login role: data access to the tables and sequences of its
/// place, nothing on the migration history or the row-tier registration table.
async fn grant_tenant_role(
    db: &Client,
    place: &Place,
    role: &str,
    tier: Tier,
) -> Result<(), tokio_postgres::Error> {
    let s = quote_ident(&place.schema);
    let r = quote_ident(role);
    let mut sql = format!(
        "GRANT USAGE ON SCHEMA {s} TO {r};
         GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA {s} TO {r};
         GRANT USAGE, SELECT ON ALL SEQUENCES IN SCHEMA {s} TO {r};
         REVOKE ALL ON TABLE {s}.{HISTORY_TABLE} FROM {r};"
    );
    if tier == Tier::Row {
        sql.push_str(&format!(
            "REVOKE ALL ON TABLE public.{ROW_TENANTS_TABLE} FROM {r};"
        ));
    }
    db.batch_execute(&sql).await
}

/// Every shared table with a `tenant_id` column gets row-level security that only shows a
/// session the rows of the tenant its connection is bound to (`row_context`), for the table's
/// owner too (FORCE). Policies and defaults from older versions (which read a custom setting a
/// client could change) are brought up to date.
pub async fn enforce_row_policies(db: &Client) -> Result<Vec<String>, tokio_postgres::Error> {
    let tables = tenant_tables(db).await?;
    let cond = row_context::POLICY_CONDITION;
    for t in &tables {
        let q = format!("public.{}", quote_ident(t));
        let has_policy = db
            .query_opt(
                "SELECT 1 FROM pg_policies WHERE schemaname = 'public' AND tablename = $1 AND policyname = $2",
                &[t, &ROW_POLICY],
            )
            .await?
            .is_some();
        let verb = if has_policy { "ALTER" } else { "CREATE" };
        db.batch_execute(&format!(
            "ALTER TABLE {q} ENABLE ROW LEVEL SECURITY; ALTER TABLE {q} FORCE ROW LEVEL SECURITY;
             {verb} POLICY {ROW_POLICY} ON {q} USING ({cond}) WITH CHECK ({cond});
             ALTER TABLE {q} ALTER COLUMN tenant_id SET DEFAULT {};",
            row_context::COLUMN_DEFAULT
        ))
        .await?;
    }
    db.batch_execute(row_context::CLEANUP_SQL).await?;
    Ok(tables)
}

/// Row-tier tables that hold tenant rows: public tables with a `tenant_id` column.
pub async fn tenant_tables(
    db: &impl tokio_postgres::GenericClient,
) -> Result<Vec<String>, tokio_postgres::Error> {
    Ok(db
        .query(
            "SELECT c.table_name FROM information_schema.columns c
             JOIN information_schema.tables t USING (table_schema, table_name)
             WHERE c.table_schema = 'public' AND c.column_name = 'tenant_id'
               AND t.table_type = 'BASE TABLE' AND c.table_name NOT LIKE 'pgtenant\\_%'
             ORDER BY 1",
            &[],
        )
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect())
}

/// Deletes a tenant: with `keep_data`, only suspends it (and ends its sessions); otherwise
/// removes its database or schema or rows, its login role and its registry entry.
pub async fn delete(
    store: &RegistryStore,
    id: &str,
    keep_data: bool,
) -> Result<(), ProvisionError> {
    if keep_data {
        store.set_status(id, TenantStatus::Suspended, true).await?;
        return Ok(());
    }
    let t = store.tenant(id).await?;
    // Proxies stop serving it and close its sessions before anything is dropped.
    store.set_status(id, TenantStatus::Deleted, true).await?;
    let err = server_err(&t.server);
    let admin = admin_client(store, &t.server, "postgres").await?;
    let tier = Tier::parse(&t.tier).unwrap_or(Tier::Database);
    let role = recorded_role(store, &t).await?;
    // A shared row role stays, with its privileges and connections, while others hold it.
    let role_shared = !store.role_holders(&t.server, &role, id).await?.is_empty();
    let ddl = Some(ddl_role_for(&role)).filter(|_| tier != Tier::Row);
    let ddl = match ddl {
        Some(d) if store.role_password(id, &d).await?.is_some() => Some(d),
        _ => None,
    };
    for r in std::iter::once(&role)
        .filter(|_| !role_shared)
        .chain(ddl.as_ref())
    {
        admin
            .execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = $1",
                &[r],
            )
            .await
            .map_err(&err)?;
    }
    let db_exists = exists(&admin, Catalog::Databases, &t.database)
        .await
        .map_err(&err)?;
    match tier {
        Tier::Database => {
            admin
                .batch_execute(&format!(
                    "DROP DATABASE IF EXISTS {} WITH (FORCE)",
                    quote_ident(&t.database)
                ))
                .await
                .map_err(&err)?;
        }
        Tier::Schema if db_exists => {
            let db = admin_client(store, &t.server, &t.database).await?;
            let s = match &t.schema {
                Some(s) => s.clone(),
                None => planned_names(store, tier, id)
                    .await?
                    .schema
                    .unwrap_or_default(),
            };
            db.batch_execute(&format!(
                "DROP SCHEMA IF EXISTS {} CASCADE",
                quote_ident(&s)
            ))
            .await
            .map_err(&err)?;
            drop_owned(&db, &role).await.map_err(&err)?;
            if let Some(ddl) = &ddl {
                drop_owned(&db, ddl).await.map_err(&err)?;
            }
        }
        Tier::Row if db_exists => {
            let db = admin_client(store, &t.server, &t.database).await?;
            let mut sql = String::from("BEGIN;");
            for table in tenant_tables(&db).await.map_err(&err)? {
                sql.push_str(&format!(
                    "DELETE FROM public.{} WHERE tenant_id = {};",
                    quote_ident(&table),
                    quote_literal(id)
                ));
            }
            sql.push_str(&format!(
                "DELETE FROM public.{ROW_TENANTS_TABLE} WHERE id = {}; COMMIT;",
                quote_literal(id)
            ));
            if db
                .query_one(
                    "SELECT to_regclass($1) IS NOT NULL",
                    &[&format!("public.{ROW_TENANTS_TABLE}")],
                )
                .await
                .map_err(&err)?
                .get::<_, bool>(0)
            {
                db.batch_execute(&sql).await.map_err(&err)?;
            }
            if !role_shared {
                drop_owned(&db, &role).await.map_err(&err)?;
            }
        }
        _ => {}
    }
    let role_exists = !role_shared && exists(&admin, Catalog::Roles, &role).await.map_err(&err)?;
    if role_exists {
        drop_owned(&admin, &role).await.map_err(&err)?;
        admin
            .batch_execute(&format!("DROP ROLE IF EXISTS {}", quote_ident(&role)))
            .await
            .map_err(&err)?;
    }
    if let Some(ddl) = &ddl {
        drop_owned(&admin, ddl).await.map_err(&err)?;
        admin
            .batch_execute(&format!("DROP ROLE IF EXISTS {}", quote_ident(ddl)))
            .await
            .map_err(&err)?;
    }
    store.remove_tenant(id).await?;
    Ok(())
}

async fn drop_owned(db: &Client, role: &str) -> Result<(), tokio_postgres::Error> {
    if exists(db, Catalog::Roles, role).await? {
        db.batch_execute(&format!("DROP OWNED BY {}", quote_ident(role)))
            .await?;
    }
    Ok(())
}

/// A catalog of named server objects.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Catalog {
    Roles,
    Databases,
    /// Of the database `db` is connected to.
    Schemas,
}

/// Whether `catalog` has an object called `name`.
pub(crate) async fn exists(
    db: &Client,
    catalog: Catalog,
    name: &str,
) -> Result<bool, tokio_postgres::Error> {
    let sql = match catalog {
        Catalog::Roles => "SELECT 1 FROM pg_catalog.pg_roles WHERE rolname = $1",
        Catalog::Databases => "SELECT 1 FROM pg_catalog.pg_database WHERE datname = $1",
        Catalog::Schemas => "SELECT 1 FROM pg_catalog.pg_namespace WHERE nspname = $1",
    };
    Ok(db.query_opt(sql, &[&name]).await?.is_some())
}

/// Gives a tenant's login role a new random password, on the server and (sealed) in the
/// registry; running proxies pick it up through the registry. A shared row role changes for
/// every tenant that holds it.
pub async fn rotate_role_password(store: &RegistryStore, id: &str) -> Result<(), ProvisionError> {
    let t = store.tenant(id).await?;
    let role = recorded_role(store, &t).await?;
    let password = random_password();
    let admin = admin_client(store, &t.server, "postgres").await?;
    ensure_login_role(&admin, &role, &password)
        .await
        .map_err(server_err(&t.server))?;
    store.put_role(id, &role, &password).await?;
    for other in store.role_holders(&t.server, &role, id).await? {
        store.put_role(&other, &role, &password).await?;
    }
    Ok(())
}

/// Gives a tenant a login role that may change the schema of its own place, for users whose
/// applications run their own migrations (ORMs): CREATE in the tenant's schema (the schema
/// tier's own one; the database tier's `public`), never in another's. What it creates, the
/// tenant's ordinary role may read and write (default privileges), and it may use the
/// platform's tables as that role does; those change only through `pgtenant migrate`.
/// Refused for the row tier, whose tables all tenants share. Returns the role's name.
pub async fn grant_ddl(store: &RegistryStore, id: &str) -> Result<String, ProvisionError> {
    let t = store.tenant(id).await?;
    let tier = Tier::parse(&t.tier).unwrap_or(Tier::Database);
    if !tier.rules().ddl {
        return Err(ProvisionError::Invalid(format!(
            "tenant \"{id}\" is of the row tier: its tables are shared with other tenants, so their schema changes only through `pgtenant migrate`, never through a tenant's connection"
        )));
    }
    let err = server_err(&t.server);
    let app = recorded_role(store, &t).await?;
    let ddl = ddl_role_for(&app);
    // The password it had, when it exists: another user of the tenant may log in with it.
    let password = match store.role_password(id, &ddl).await? {
        Some(p) => p.expose().to_string(),
        None => random_password(),
    };
    let admin = admin_client(store, &t.server, "postgres").await?;
    ensure_login_role(&admin, &ddl, &password)
        .await
        .map_err(&err)?;
    store.put_role(id, &ddl, &password).await?;
    let place = migrate::place_of(&t, tier);
    let db = admin_client(store, &t.server, &place.database).await?;
    grant_tenant_role(&db, &place, &ddl, tier)
        .await
        .map_err(&err)?;
    let (s, d, a) = (
        quote_ident(&place.schema),
        quote_ident(&ddl),
        quote_ident(&app),
    );
    db.batch_execute(&format!(
        "GRANT CONNECT ON DATABASE {} TO {d};
         GRANT CREATE ON SCHEMA {s} TO {d};
         ALTER DEFAULT PRIVILEGES FOR ROLE {d} IN SCHEMA {s}
             GRANT SELECT, INSERT, UPDATE, DELETE ON TABLES TO {a};
         ALTER DEFAULT PRIVILEGES FOR ROLE {d} IN SCHEMA {s}
             GRANT USAGE, SELECT ON SEQUENCES TO {a};
         ALTER DEFAULT PRIVILEGES FOR ROLE {d} IN SCHEMA {s}
             GRANT EXECUTE ON FUNCTIONS TO {a};",
        quote_ident(&place.database)
    ))
    .await
    .map_err(&err)?;
    Ok(ddl)
}

/// The login role the tenant's client users map to.
pub async fn role_of(store: &RegistryStore, id: &str) -> Result<String, ProvisionError> {
    let t = store.tenant(id).await?;
    recorded_role(store, &t).await
}

/// The tenant's login role as recorded (row tenants created before roles were shared keep
/// their own), else the one `tenant create` gives it.
async fn recorded_role(store: &RegistryStore, t: &TenantRecord) -> Result<String, ProvisionError> {
    let tier = Tier::parse(&t.tier).unwrap_or(Tier::Database);
    Ok(match store.role_name(&t.id).await? {
        Some(name) => name,
        None => planned_names(store, tier, &t.id).await?.role,
    })
}

/// The opaque names (`tenancy::naming`) `tenant create` gives tenant `id` of `tier`.
pub async fn planned_names(
    store: &RegistryStore,
    tier: Tier,
    id: &str,
) -> Result<ObjectNames, ProvisionError> {
    let stem = store.naming_key().await?.stem(id);
    Ok(ObjectNames::for_tier(
        tier,
        &stem,
        &store.cfg.schema_database,
        &store.cfg.row_database,
    ))
}

/// `NAME=VALUE` pairs of option `--flag` into a map, each checked by `check`, which also
/// gives the (name, value) to keep.
fn parse_pairs(
    flag: &str,
    pairs: &[String],
    check: impl Fn(&str, &str) -> Result<(String, String), String>,
) -> Result<BTreeMap<String, String>, ProvisionError> {
    let mut out = BTreeMap::new();
    for p in pairs {
        let (k, v) = p
            .split_once('=')
            .ok_or_else(|| ProvisionError::Invalid(format!("--{flag} {p}: expected NAME=VALUE")))?;
        let (k, v) =
            check(k, v).map_err(|e| ProvisionError::Invalid(format!("--{flag} {k}: {e}")))?;
        out.insert(k, v);
    }
    Ok(out)
}

/// `--limit` caps (`tenancy::limits`).
pub fn parse_limits(pairs: &[String]) -> Result<BTreeMap<String, String>, ProvisionError> {
    parse_pairs("limit", pairs, |k, v| {
        crate::tenancy::limits::validate(k, v)?;
        Ok((k.to_ascii_lowercase(), v.trim().to_string()))
    })
}

/// `--param` session defaults.
pub fn parse_params(pairs: &[String]) -> Result<BTreeMap<String, String>, ProvisionError> {
    parse_pairs("param", pairs, |k, v| {
        if !validate::is_setting_name(k)
            || validate::is_tier_owned_setting(k, crate::tenancy::row_context::TENANT_SETTING)
        {
            return Err("not a setting a tenant may set".into());
        }
        Ok((k.to_string(), v.to_string()))
    })
}
