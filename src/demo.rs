//! `pgtenant demo` and the sample tenants it (and the test suite) provisions: a throwaway
//! PostgreSQL, six tenants, two per tier, each with a tiny `accounts` table.

use std::collections::BTreeMap;

use rand::distributions::Alphanumeric;
use rand::Rng;

use crate::cluster::PgCluster;
use crate::config::{Config, ServerConfig, TenantConfig, TenantStatus, Tier, UserConfig};
use crate::credentials::hash_password;
use crate::pg_error::describe_pg_error;
use crate::secret::Secret;
use crate::tenancy::crypto::MasterKey;
use crate::tenancy::row_context;
use crate::tenancy::tier::{quote_ident, quote_literal};

/// Password of every demo client user.
pub const DEMO_PASSWORD: &str = "demo";
/// Client role of every demo user.
pub const DEMO_ROLE: &str = "app";
/// The demo's client user with DDL rights in its tenant's own place (database and schema tiers,
/// as `tenant update --user NAME --ddl` gives): `pgbench -i` or an ORM's migrations run as it.
pub const DEMO_DDL_ROLE: &str = "migrator";
/// Shared database of the schema-tier tenants.
pub const SCHEMA_DATABASE: &str = "schema_tenants";
/// Shared database of the row-tier tenants.
pub const ROW_DATABASE: &str = "row_tenants";

#[derive(Debug, Clone)]
pub struct SampleTenant {
    pub id: &'static str,
    pub tier: Tier,
    /// Which server of those provisioned it lives on (database tier may use any).
    pub server: usize,
    /// Owners of the rows in its accounts table.
    pub owners: &'static [&'static str],
}

pub fn sample_tenants() -> Vec<SampleTenant> {
    vec![
        SampleTenant {
            id: "acme",
            tier: Tier::Database,
            server: 0,
            owners: &["Ada", "Alan"],
        },
        SampleTenant {
            id: "globex",
            tier: Tier::Database,
            server: 0,
            owners: &["Grace", "Gordon"],
        },
        SampleTenant {
            id: "initech",
            tier: Tier::Schema,
            server: 0,
            owners: &["Ian", "Ivy"],
        },
        SampleTenant {
            id: "umbrella",
            tier: Tier::Schema,
            server: 0,
            owners: &["Uma", "Ulf"],
        },
        SampleTenant {
            id: "hooli",
            tier: Tier::Row,
            server: 0,
            owners: &["Hal", "Hana"],
        },
        SampleTenant {
            id: "piedpiper",
            tier: Tier::Row,
            server: 0,
            owners: &["Pia", "Pete"],
        },
    ]
}

#[derive(Debug, thiserror::Error)]
pub enum ProvisionError {
    #[error("provisioning on server \"{server}\" failed: {message}")]
    Sql { server: String, message: String },
}

/// The backend login role of a tenant.
pub fn backend_role(t: &SampleTenant) -> String {
    match t.tier {
        Tier::Row => "row_app".to_string(),
        _ => format!("{}_app", t.id),
    }
}

/// Creates databases, schemas, roles, tables and rows for `tenants` on `servers` (name,
/// cluster), and returns a config that serves them.
pub async fn provision(
    servers: &[(&str, &PgCluster)],
    tenants: &[SampleTenant],
) -> Result<Config, ProvisionError> {
    let mut config = Config::empty();
    config.servers = servers
        .iter()
        .map(|(name, c)| ServerConfig::new(*name, c.host(), c.port()))
        .collect();
    let verifier = hash_password(DEMO_PASSWORD);
    let mut passwords: BTreeMap<(usize, String), String> = BTreeMap::new();
    // Row-tier context proofs need a key the proxy and the database share; it lives in a
    // private file beside the first cluster.
    let row_key_text = MasterKey::generate_text();
    let row_key_path = servers[0].1.dir().join("row.key");
    crate::secret::write_private(&row_key_path, &row_key_text).map_err(|e| {
        ProvisionError::Sql {
            server: servers[0].0.to_string(),
            message: format!("cannot write {}: {e}", row_key_path.display()),
        }
    })?;
    let row_secret = MasterKey::from_text(&row_key_text)
        .ok_or_else(|| ProvisionError::Sql {
            server: servers[0].0.to_string(),
            message: "generated row key does not parse".into(),
        })?
        .row_secret();
    config.row_key = Some(format!("file:{}", row_key_path.display()));

    for t in tenants {
        let (name, cluster) = servers[t.server];
        let err = |e: tokio_postgres::Error| ProvisionError::Sql {
            server: name.to_string(),
            message: describe_pg_error(&e),
        };
        let admin = cluster.connect("postgres").await.map_err(err)?;
        let role = backend_role(t);
        let password = passwords
            .entry((t.server, role.clone()))
            .or_insert_with(random_password)
            .clone();
        let exists = admin
            .query_opt("SELECT 1 FROM pg_roles WHERE rolname = $1", &[&role])
            .await
            .map_err(err)?
            .is_some();
        if !exists {
            admin
                .batch_execute(&format!(
                    "CREATE ROLE {} LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE NOBYPASSRLS PASSWORD {}",
                    quote_ident(&role),
                    quote_literal(&hash_password(&password))
                ))
                .await
                .map_err(err)?;
        }
        let database = match t.tier {
            Tier::Database => t.id.to_string(),
            Tier::Schema => SCHEMA_DATABASE.to_string(),
            Tier::Row => ROW_DATABASE.to_string(),
        };
        let db_exists = admin
            .query_opt("SELECT 1 FROM pg_database WHERE datname = $1", &[&database])
            .await
            .map_err(err)?
            .is_some();
        if !db_exists {
            let db = quote_ident(&database);
            // CREATE DATABASE cannot share a multi-statement (implicitly transactional) batch.
            admin
                .batch_execute(&format!("CREATE DATABASE {db}"))
                .await
                .map_err(err)?;
            admin
                .batch_execute(&format!("REVOKE ALL ON DATABASE {db} FROM PUBLIC"))
                .await
                .map_err(err)?;
        }
        let db = cluster.connect(&database).await.map_err(err)?;
        let r = quote_ident(&role);
        let d = quote_ident(&database);
        let rows = |tenant_col: bool| -> String {
            t.owners
                .iter()
                .enumerate()
                .map(|(i, o)| {
                    if tenant_col {
                        format!(
                            "({}, {}, {})",
                            quote_literal(t.id),
                            quote_literal(o),
                            100 * (i + 1)
                        )
                    } else {
                        format!("({}, {})", quote_literal(o), 100 * (i + 1))
                    }
                })
                .collect::<Vec<_>>()
                .join(", ")
        };
        let sql = match t.tier {
            Tier::Database => format!(
                "GRANT CONNECT, TEMPORARY ON DATABASE {d} TO {r};
                 REVOKE CREATE ON SCHEMA public FROM PUBLIC;
                 CREATE TABLE accounts (id serial PRIMARY KEY, tenant_id text NOT NULL DEFAULT {tid},
                                        owner text NOT NULL, balance numeric NOT NULL DEFAULT 0);
                 INSERT INTO accounts (owner, balance) VALUES {rows};
                 GRANT SELECT, INSERT, UPDATE, DELETE ON accounts TO {r};
                 GRANT USAGE ON SEQUENCE accounts_id_seq TO {r};",
                tid = quote_literal(t.id),
                rows = rows(false)
            ),
            Tier::Schema => format!(
                "GRANT CONNECT ON DATABASE {d} TO {r};
                 REVOKE CREATE ON SCHEMA public FROM PUBLIC;
                 CREATE SCHEMA {s};
                 GRANT USAGE ON SCHEMA {s} TO {r};
                 CREATE TABLE {s}.accounts (id serial PRIMARY KEY, tenant_id text NOT NULL DEFAULT {tid},
                                            owner text NOT NULL, balance numeric NOT NULL DEFAULT 0);
                 INSERT INTO {s}.accounts (owner, balance) VALUES {rows};
                 GRANT SELECT, INSERT, UPDATE, DELETE ON {s}.accounts TO {r};
                 GRANT USAGE ON SEQUENCE {s}.accounts_id_seq TO {r};",
                s = quote_ident(t.id),
                tid = quote_literal(t.id),
                rows = rows(false)
            ),
            Tier::Row => {
                let table_exists = db
                    .query_opt("SELECT 1 FROM pg_class WHERE relname = 'accounts' AND relnamespace = 'public'::regnamespace", &[])
                    .await
                    .map_err(err)?
                    .is_some();
                let mut sql = String::new();
                if !table_exists {
                    row_context::install(&db, &row_secret.row_key(&database))
                        .await
                        .map_err(err)?;
                    let cond = row_context::POLICY_CONDITION;
                    sql.push_str(&format!(
                        "GRANT CONNECT ON DATABASE {d} TO {r};
                         REVOKE CREATE ON SCHEMA public FROM PUBLIC;
                         CREATE TABLE accounts (id serial PRIMARY KEY,
                             tenant_id text NOT NULL DEFAULT {default},
                             owner text NOT NULL, balance numeric NOT NULL DEFAULT 0);
                         CREATE INDEX ON accounts (tenant_id);
                         ALTER TABLE accounts ENABLE ROW LEVEL SECURITY;
                         ALTER TABLE accounts FORCE ROW LEVEL SECURITY;
                         CREATE POLICY tenant_rows ON accounts USING ({cond}) WITH CHECK ({cond});
                         GRANT SELECT, INSERT, UPDATE, DELETE ON accounts TO {r};
                         GRANT USAGE ON SEQUENCE accounts_id_seq TO {r};",
                        default = row_context::COLUMN_DEFAULT
                    ));
                }
                sql.push_str(&format!(
                    "INSERT INTO accounts (tenant_id, owner, balance) VALUES {};",
                    rows(true)
                ));
                sql
            }
        };
        db.batch_execute(&sql).await.map_err(err)?;

        config.tenants.push(TenantConfig {
            id: t.id.to_string(),
            tier: t.tier,
            server: name.to_string(),
            database,
            schema: (t.tier == Tier::Schema).then(|| t.id.to_string()),
            pool_size: Some(5),
            min_idle: None,
            weight: None,
            query_wait_timeout: None,
            server_idle_timeout: None,
            pool_mode: None,
            max_client_connections: None,
            status: TenantStatus::Active,
            params: BTreeMap::from([("TimeZone".to_string(), "UTC".to_string())]),
            limits: BTreeMap::new(),
            replicas: None,
            slow_transaction_ms: None,
            read_write_split: false,
            replica_fallback: true,
            require_tls: false,
            session_features: None,
            users: vec![UserConfig {
                name: DEMO_ROLE.to_string(),
                scram: verifier.clone(),
                backend_user: role,
                backend_password: Some(Secret::new(password)),
                backend_password_env: None,
                read_only: false,
                auth: Default::default(),
                session_features: None,
            }],
        });
    }
    Ok(config)
}

fn random_password() -> String {
    rand::thread_rng()
        .sample_iter(&Alphanumeric)
        .take(24)
        .map(char::from)
        .collect()
}

/// The psql command line that connects to `tenant` through a proxy on `addr`, over TLS.
pub fn psql_line(addr: std::net::SocketAddr, tenant: &str) -> String {
    format!(
        "psql \"postgresql://{DEMO_ROLE}.{tenant}:{DEMO_PASSWORD}@{}:{}/{tenant}?sslmode=require\"",
        addr.ip(),
        addr.port()
    )
}

/// A self-signed certificate for localhost and 127.0.0.1, written to `dir` (the key readable
/// by its owner only), and the `[tls]` section that serves it: TLS offered, plaintext allowed.
pub fn self_signed_tls(dir: &std::path::Path) -> Result<crate::config::TlsConfig, String> {
    let (cert_path, key_path) =
        crate::tls::write_self_signed(dir, &["localhost".into(), "127.0.0.1".into()])?;
    Ok(crate::config::TlsConfig {
        cert: Some(cert_path),
        key: Some(key_path),
        mode: Some(crate::config::TlsMode::Allow),
        ..Default::default()
    })
}

/// The demo's one migration, applied to every tenant in its tier's place.
pub const DEMO_MIGRATION: &str = "CREATE TABLE accounts (
    id serial PRIMARY KEY,
    tenant_id text,
    owner text NOT NULL,
    balance numeric NOT NULL DEFAULT 0
);
CREATE INDEX accounts_tenant_id ON accounts (tenant_id);
";

/// Database on the demo cluster that holds the registry.
pub const REGISTRY_DATABASE: &str = "pgtenant_registry";

/// The registry path of the demo: a registry database and a master key file on `cluster`,
/// a migration directory, and the sample tenants made by the same code as `tenant create`,
/// each seeded with two accounts. Files go to `dir`; returns the config that serves them.
pub async fn provision_registry(
    cluster: &PgCluster,
    dir: &std::path::Path,
) -> Result<Config, String> {
    use crate::config::RegistryConfig;
    use crate::tenancy::provision::{self, CreateRequest};
    use crate::tenancy::store::{RegistryStore, TenantSettings};

    let key_path = dir.join("master.key");
    crate::secret::write_private(&key_path, &MasterKey::generate_text())
        .map_err(|e| e.to_string())?;
    let migrations = dir.join("migrations");
    std::fs::create_dir_all(&migrations).map_err(|e| e.to_string())?;
    std::fs::write(migrations.join("V1__accounts.sql"), DEMO_MIGRATION)
        .map_err(|e| e.to_string())?;
    let admin = cluster
        .connect("postgres")
        .await
        .map_err(|e| describe_pg_error(&e))?;
    admin
        .batch_execute(&format!("CREATE DATABASE {REGISTRY_DATABASE}"))
        .await
        .map_err(|e| describe_pg_error(&e))?;

    let mut config = Config::empty();
    let mut registry = RegistryConfig::new(
        format!(
            "host={} port={} user=postgres dbname={REGISTRY_DATABASE}",
            cluster.host(),
            cluster.port()
        ),
        format!("file:{}", key_path.display()),
    );
    registry.migrations = Some(migrations.clone());
    config.registry = Some(registry.clone());

    let store = RegistryStore::open(&registry)
        .await
        .map_err(|e| e.to_string())?;
    store
        .put_server(&crate::tenancy::store::NewServer {
            name: "local",
            host: cluster.host(),
            port: cluster.port(),
            admin_user: "postgres",
            admin_password: None,
            tls: &Default::default(),
            max_connections: None,
        })
        .await
        .map_err(|e| e.to_string())?;
    let migs = crate::tenancy::migrate::load_dir(&migrations).map_err(|e| e.to_string())?;
    let verifier = hash_password(DEMO_PASSWORD);
    for t in sample_tenants() {
        let req = CreateRequest {
            id: t.id.to_string(),
            tier: t.tier,
            server: None,
            settings: TenantSettings {
                pool_size: Some(5),
                params: Some(BTreeMap::from([(
                    "TimeZone".to_string(),
                    "UTC".to_string(),
                )])),
                ..TenantSettings::default()
            },
            users: vec![(DEMO_ROLE.to_string(), verifier.clone())],
        };
        let record = provision::create(&store, &req, &migs)
            .await
            .map_err(|e| format!("tenant {}: {e}", t.id))?;
        if t.tier != Tier::Row {
            let ddl = provision::grant_ddl(&store, t.id)
                .await
                .map_err(|e| format!("tenant {}: {e}", t.id))?;
            store
                .put_user(
                    t.id,
                    DEMO_DDL_ROLE,
                    &verifier,
                    &ddl,
                    false,
                    Default::default(),
                )
                .await
                .map_err(|e| format!("tenant {}: {e}", t.id))?;
        }
        let db = cluster
            .connect(&record.database)
            .await
            .map_err(|e| describe_pg_error(&e))?;
        let table = match &record.schema {
            Some(s) => format!("{}.accounts", quote_ident(s)),
            None => "accounts".to_string(),
        };
        for (i, owner) in t.owners.iter().enumerate() {
            db.execute(
                &format!(
                    "INSERT INTO {table} (tenant_id, owner, balance) VALUES ($1, $2, $3::int)"
                ),
                &[&t.id, owner, &(100 * (i as i32 + 1))],
            )
            .await
            .map_err(|e| describe_pg_error(&e))?;
        }
    }
    Ok(config)
}
