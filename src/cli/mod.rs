//! The registry-facing commands: `registry`, `server`, `tenant` and `migrate`. Each reads the
//! registry connection from `--config`.

pub mod migrate;
pub mod output;

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Args, Subcommand};

use crate::config::{Config, PoolMode, RegistryConfig, TenantStatus, Tier};
use crate::credentials::hash_password;
use crate::tenancy::crypto::MasterKey;
use crate::tenancy::migrate::{load_dir, Migration};
use crate::tenancy::provision::{self, CreateRequest, ProvisionError};
use crate::tenancy::store::{RegistryStore, TenantRows, TenantSettings};

#[derive(Subcommand, Debug)]
pub enum RegistryCmd {
    /// Create the registry schema, or upgrade it.
    Init,
    /// Print a new random master key (base64) for a key file.
    GenKey,
    /// Re-encrypt every stored password under `registry.key`; list the old key in
    /// `registry.old_keys` (of this config and of running proxies) until this has run.
    RotateKey,
    /// Schema version, key ids in use, counts.
    Status {
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand, Debug)]
pub enum ServerCmd {
    /// Register (or update) a PostgreSQL server tenants can live on.
    Add {
        name: String,
        #[arg(long)]
        host: String,
        #[arg(long, default_value_t = 5432)]
        port: u16,
        /// Role with CREATEDB and CREATEROLE that provisions tenants.
        #[arg(long, default_value = "postgres")]
        admin_user: String,
        /// Read the admin password from standard input (stored encrypted).
        #[arg(long)]
        admin_password_stdin: bool,
        /// TLS to the server: disable, prefer (default), require, verify-ca, verify-full.
        #[arg(long, value_parser = parse_sslmode)]
        sslmode: Option<crate::config::SslMode>,
        /// CA bundle (PEM) the server's certificate must chain to; a path on the proxies' hosts.
        #[arg(long)]
        sslrootcert: Option<std::path::PathBuf>,
        /// Client certificate (PEM) pgtenant presents, with --sslkey.
        #[arg(long)]
        sslcert: Option<std::path::PathBuf>,
        #[arg(long)]
        sslkey: Option<std::path::PathBuf>,
        /// Connections all pools together may hold to the server (its budget). Default: the
        /// server's max_connections minus its reserved ones minus pool.server_reserve.
        #[arg(long, value_parser = clap::value_parser!(i32).range(1..))]
        max_connections: Option<i32>,
    },
    /// List registered servers.
    List {
        #[arg(long)]
        json: bool,
    },
}

fn parse_session_features(s: &str) -> Result<crate::config::SessionFeatures, String> {
    match s {
        "pin" => Ok(crate::config::SessionFeatures::Pin),
        "refuse" => Ok(crate::config::SessionFeatures::Refuse),
        _ => Err("use pin or refuse".into()),
    }
}

fn parse_auth(s: &str) -> Result<crate::config::AuthMethod, String> {
    crate::config::AuthMethod::parse(s)
        .ok_or_else(|| "use scram, scram-plus, cert or scram+cert".to_string())
}

fn parse_sslmode(s: &str) -> Result<crate::config::SslMode, String> {
    crate::config::SslMode::parse(s)
        .ok_or_else(|| "use disable, prefer, require, verify-ca or verify-full".to_string())
}

#[derive(Subcommand, Debug)]
pub enum AdminCmd {
    /// Add (or change the password of) an admin console user; password from standard input.
    Add { name: String },
    /// Remove an admin console user.
    Remove { name: String },
    /// List admin console users kept in the registry.
    List {
        #[arg(long)]
        json: bool,
    },
}

#[derive(Args, Debug, Default, Clone)]
pub struct SettingArgs {
    #[arg(long)]
    pub display_name: Option<String>,
    #[arg(long)]
    pub pool_size: Option<i32>,
    #[arg(long)]
    pub min_idle: Option<i32>,
    #[arg(long, value_parser = parse_mode)]
    pub pool_mode: Option<PoolMode>,
    #[arg(long)]
    pub query_wait_timeout: Option<i32>,
    #[arg(long)]
    pub server_idle_timeout: Option<i32>,
    #[arg(long)]
    pub max_client_connections: Option<i32>,
    #[arg(long)]
    pub auto_update: Option<bool>,
    /// Session default for the tenant's backend connections, NAME=VALUE (repeatable).
    #[arg(long = "param")]
    pub params: Vec<String>,
    /// Cap on a setting, NAME=VALUE (repeatable), e.g. statement_timeout=30s: a client may not
    /// raise it beyond its transaction.
    #[arg(long = "limit")]
    pub limits: Vec<String>,
    /// Read-replica server (repeatable).
    #[arg(long = "replica")]
    pub replicas: Vec<String>,
    /// Transaction mode: send transactions begun READ ONLY to a replica.
    #[arg(long)]
    pub read_write_split: Option<bool>,
    /// Serve reads from the primary when no replica is usable (default true).
    #[arg(long)]
    pub replica_fallback: Option<bool>,
    /// Log this tenant's transactions slower than this many ms (0: off; default: the
    /// proxy's log.slow_transaction_ms).
    #[arg(long)]
    pub slow_transaction_ms: Option<i32>,
    /// Its clients must connect with TLS (told after a correct password).
    #[arg(long)]
    pub require_tls: Option<bool>,
    /// Transaction mode, a statement whose effect outlives its transaction: pin (keep the
    /// client on its server connection) or refuse (0A000). Default: the proxy's [pool] setting.
    #[arg(long, value_parser = parse_session_features)]
    pub session_features: Option<crate::config::SessionFeatures>,
    /// Its share of a full server budget relative to other tenants' (default 1).
    #[arg(long, value_parser = clap::value_parser!(i32).range(1..))]
    pub weight: Option<i32>,
}

#[derive(Subcommand, Debug)]
pub enum TenantCmd {
    /// Provision a tenant for real and register it. Re-running a create that was interrupted
    /// completes it.
    Create {
        id: String,
        #[arg(long, value_parser = parse_tier)]
        tier: Tier,
        /// Server to place it on (default: the only registered one).
        #[arg(long)]
        server: Option<String>,
        /// Client role(s) to create; default `app`.
        #[arg(long = "user")]
        users: Vec<String>,
        /// The users created may create and change tables in the tenant's own schema (an
        /// application's own migrations); not for the row tier.
        #[arg(long)]
        ddl: bool,
        /// Read the client password from standard input instead of generating one.
        #[arg(long)]
        password_stdin: bool,
        #[command(flatten)]
        settings: SettingArgs,
        #[arg(long)]
        json: bool,
    },
    List {
        #[arg(long)]
        json: bool,
    },
    Show {
        id: String,
        #[arg(long)]
        json: bool,
    },
    /// Change pool settings and limits; `--rotate-password` gives the backend role a new one.
    Update {
        id: String,
        #[command(flatten)]
        settings: SettingArgs,
        #[arg(long)]
        rotate_password: bool,
        /// Add or replace a client user (password from standard input).
        #[arg(long)]
        user: Option<String>,
        /// With --user: the user reads from the tenant's replicas and cannot write.
        #[arg(long, requires = "user")]
        read_only: bool,
        /// With --user: the user may create and change tables in the tenant's own schema (an
        /// application's own migrations); not for the row tier.
        #[arg(long, requires = "user", conflicts_with = "read_only")]
        ddl: bool,
        /// With --user: scram (default), scram-plus (channel binding required), cert (a client
        /// certificate naming role.tenant, no password read) or scram+cert.
        #[arg(long, requires = "user", value_parser = parse_auth)]
        auth: Option<crate::config::AuthMethod>,
        /// NAME=pin|refuse|tenant: a client user's own answer to session features in
        /// transaction mode, over the tenant's (`tenant`: the tenant's again). Repeatable.
        #[arg(long = "user-session-features", value_name = "NAME=MODE")]
        user_session_features: Vec<String>,
        #[arg(long)]
        json: bool,
    },
    /// Refuse new connections; `--terminate` also closes the existing ones.
    Suspend {
        id: String,
        #[arg(long)]
        terminate: bool,
    },
    Resume {
        id: String,
    },
    /// Remove the tenant and all its data; `--keep-data` only suspends it.
    Delete {
        id: String,
        #[arg(long)]
        keep_data: bool,
    },
    /// Give a tenant created before opaque names (or every tenant, with --all) the names
    /// `tenant create` gives today: its database, schema and login roles are renamed on the
    /// server and in the registry. The tenant is suspended (its sessions closed) meanwhile.
    RenameObjects {
        #[arg(required_unless_present = "all", conflicts_with = "all")]
        id: Option<String>,
        #[arg(long)]
        all: bool,
        #[arg(long)]
        json: bool,
    },
    /// Export the tenant's data (pg_dump format; row tier: its rows only).
    Dump {
        id: String,
        #[arg(long, short)]
        output: Option<PathBuf>,
    },
}

#[derive(Args, Debug)]
pub struct MigrateArgs {
    /// Show what would be applied, change nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Tenants migrated at once (default: registry.migrate_concurrency).
    #[arg(long)]
    pub concurrency: Option<usize>,
    #[arg(long)]
    pub json: bool,
}

fn parse_tier(s: &str) -> Result<Tier, String> {
    Tier::parse(s).ok_or_else(|| "expected database, schema or row".into())
}

fn parse_mode(s: &str) -> Result<PoolMode, String> {
    match s {
        "session" => Ok(PoolMode::Session),
        "transaction" => Ok(PoolMode::Transaction),
        _ => Err("expected session or transaction".into()),
    }
}

/// A command's failure: the message and the exit code (2: config, 1: anything else).
pub struct Failure(pub String, pub u8);

impl<E: std::fmt::Display> From<E> for Failure {
    fn from(e: E) -> Self {
        Failure(e.to_string(), 1)
    }
}

pub fn finish(r: Result<(), Failure>) -> ExitCode {
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(Failure(msg, code)) => {
            eprintln!("error: {msg}");
            ExitCode::from(code)
        }
    }
}

/// `pgtenant row-tier-install`: the context check and the policies, in one database.
pub async fn row_tier_install(url: &str, config: &Path) -> Result<(), Failure> {
    let c = load_config(config)?;
    let secret = crate::context::row_secret(&c).await?.ok_or_else(|| {
        Failure(
            format!(
                "{}: no row_key and no [registry] key to derive the row key from",
                config.display()
            ),
            2,
        )
    })?;
    let mut pg: tokio_postgres::Config = url.parse()?;
    // The URL's own sslmode (disable, prefer, require) decides, as for any libpq client.
    let mode = match pg.get_ssl_mode() {
        tokio_postgres::config::SslMode::Disable => crate::config::SslMode::Disable,
        tokio_postgres::config::SslMode::Require => crate::config::SslMode::Require,
        _ => crate::config::SslMode::Prefer,
    };
    let tls = crate::tls::BackendTls::build(&crate::config::BackendTlsConfig {
        sslmode: Some(mode),
        ..Default::default()
    })?;
    let connector = tls.for_tokio_postgres(&mut pg);
    let (db, conn) = pg
        .connect(connector)
        .await
        .map_err(|e| Failure(crate::pg_error::describe_pg_error(&e), 1))?;
    tokio::spawn(conn);
    let describe = |e: tokio_postgres::Error| Failure(crate::pg_error::describe_pg_error(&e), 1);
    let database: String = db
        .query_one("SELECT current_database()", &[])
        .await
        .map_err(describe)?
        .get(0);
    let open = crate::tenancy::row_context::install(&db, &secret.row_key(&database))
        .await
        .map_err(describe)?;
    if !open.is_empty() {
        eprintln!(
            "warning: not connected as a superuser, so every role may still run {} in \"{database}\": row tenants sharing a login role can read each other's running statements and cancel or end each other's sessions. Run `REVOKE EXECUTE ON FUNCTION ... FROM PUBLIC` for them as a superuser (docs/isolation.md).",
            open.join(", ")
        );
    }
    let tables = provision::enforce_row_policies(&db)
        .await
        .map_err(describe)?;
    println!(
        "row tier ready in database \"{database}\": context check installed, policies on {} table(s): {}",
        tables.len(),
        tables.join(", ")
    );
    Ok(())
}

fn load_config(config: &Path) -> Result<Config, Failure> {
    Config::load(config).map_err(|e| Failure(format!("{}: {e}", config.display()), 2))
}

fn load(config: &Path) -> Result<(Config, RegistryConfig), Failure> {
    let c = load_config(config)?;
    let r = c.registry.clone().ok_or_else(|| {
        Failure(
            format!(
                "{}: no [registry] section: these commands work on a registry database",
                config.display()
            ),
            2,
        )
    })?;
    Ok((c, r))
}

async fn open(config: &Path) -> Result<(Config, RegistryStore), Failure> {
    let (c, r) = load(config)?;
    let store = RegistryStore::open(&r).await?;
    Ok((c, store))
}

fn migrations(store: &RegistryStore) -> Result<Vec<Migration>, Failure> {
    match &store.cfg.migrations {
        Some(dir) => Ok(load_dir(dir)?),
        None => Ok(Vec::new()),
    }
}

fn read_stdin_line(what: &str) -> Result<String, Failure> {
    let mut s = String::new();
    std::io::stdin().read_to_string(&mut s)?;
    let s = s.trim_end_matches(['\n', '\r']).to_string();
    if s.is_empty() {
        return Err(Failure(format!("empty {what} on standard input"), 1));
    }
    Ok(s)
}

fn settings(a: &SettingArgs) -> Result<TenantSettings, ProvisionError> {
    Ok(TenantSettings {
        display_name: a.display_name.clone(),
        pool_size: a.pool_size,
        pool_min_idle: a.min_idle,
        pool_mode: a.pool_mode,
        query_wait_timeout: a.query_wait_timeout,
        server_idle_timeout: a.server_idle_timeout,
        max_client_connections: a.max_client_connections,
        auto_update: a.auto_update,
        params: if a.params.is_empty() {
            None
        } else {
            Some(provision::parse_params(&a.params)?)
        },
        limits: if a.limits.is_empty() {
            None
        } else {
            Some(provision::parse_limits(&a.limits)?)
        },
        replicas: if a.replicas.is_empty() {
            None
        } else {
            Some(a.replicas.clone())
        },
        read_write_split: a.read_write_split,
        replica_fallback: a.replica_fallback,
        slow_transaction_ms: a.slow_transaction_ms,
        require_tls: a.require_tls,
        session_features: a.session_features,
        weight: a.weight,
    })
}

pub async fn registry(cmd: RegistryCmd, config: &Path) -> Result<(), Failure> {
    match cmd {
        RegistryCmd::GenKey => {
            println!("{}", MasterKey::generate_text());
        }
        RegistryCmd::Init => {
            let (_, store) = open(config).await?;
            println!(
                "registry ready (schema version {}, key {})",
                crate::tenancy::store::schema::STEPS.len(),
                store.keys.current_id()
            );
        }
        RegistryCmd::RotateKey => {
            let (_, store) = open(config).await?;
            let n = store.rotate_key().await?;
            let left = store.values_under_old_keys().await?;
            println!(
                "{n} stored passwords re-encrypted under key {}; {left} left under other keys",
                store.keys.current_id()
            );
            if left > 0 {
                return Err(Failure("some values were not re-encrypted".into(), 1));
            }
        }
        RegistryCmd::Status { json } => {
            let (_, store) = open(config).await?;
            let rows = store
                .client
                .query(
                    "SELECT split_part(v, '$', 2) AS key_id, count(*) FROM (
                         SELECT password AS v FROM pgtenant.backend_roles
                         UNION ALL SELECT admin_password FROM pgtenant.servers
                         WHERE admin_password IS NOT NULL) s GROUP BY 1 ORDER BY 1",
                    &[],
                )
                .await
                .map_err(crate::tenancy::store::RegistryError::from)?;
            let keys: Vec<(String, i64)> = rows.iter().map(|r| (r.get(0), r.get(1))).collect();
            let tenants = store.tenant_rows(None).await?.len();
            if json {
                println!(
                    "{}",
                    output::json(&serde_json::json!({
                        "schema_version": crate::tenancy::store::schema::STEPS.len(),
                        "current_key": store.keys.current_id(),
                        "tenants": tenants,
                        "values_by_key": keys.iter().map(|(k, n)| serde_json::json!({"key_id": k, "values": n})).collect::<Vec<_>>(),
                    }))
                );
            } else {
                println!("current key: {}", store.keys.current_id());
                println!("tenants: {tenants}");
                println!(
                    "{}",
                    output::table(
                        &["key id", "stored values"],
                        keys.iter()
                            .map(|(k, n)| vec![k.clone(), n.to_string()])
                            .collect()
                    )
                );
            }
        }
    }
    Ok(())
}

pub async fn server(cmd: ServerCmd, config: &Path) -> Result<(), Failure> {
    let (_, store) = open(config).await?;
    match cmd {
        ServerCmd::Add {
            name,
            host,
            port,
            admin_user,
            admin_password_stdin,
            sslmode,
            sslrootcert,
            sslcert,
            sslkey,
            max_connections,
        } => {
            let pw = if admin_password_stdin {
                Some(read_stdin_line("password")?)
            } else {
                None
            };
            let tls = crate::config::BackendTlsConfig {
                sslmode,
                sslrootcert,
                sslcert,
                sslkey,
            };
            // Refuse settings that cannot work here before any proxy tries them.
            crate::tls::BackendTls::build(&tls).map_err(|e| Failure(e.to_string(), 2))?;
            store
                .put_server(&crate::tenancy::store::NewServer {
                    name: &name,
                    host: &host,
                    port,
                    admin_user: &admin_user,
                    admin_password: pw.as_deref(),
                    tls: &tls,
                    max_connections,
                })
                .await?;
            println!("server {name} registered ({host}:{port}, admin {admin_user})");
        }
        ServerCmd::List { json } => {
            let servers = store.servers().await?;
            if json {
                println!("{}", output::json(&servers));
            } else {
                println!(
                    "{}",
                    output::table(
                        &["name", "host", "port", "admin user", "admin password"],
                        servers
                            .iter()
                            .map(|s| vec![
                                s.name.clone(),
                                s.host.clone(),
                                s.port.to_string(),
                                s.admin_user.clone(),
                                if s.admin_password.is_some() {
                                    "(encrypted)"
                                } else {
                                    "-"
                                }
                                .into(),
                            ])
                            .collect()
                    )
                );
            }
        }
    }
    Ok(())
}

pub async fn tenant(cmd: TenantCmd, config: &Path) -> Result<(), Failure> {
    let (cfg, store) = open(config).await?;
    match cmd {
        TenantCmd::Create {
            id,
            tier,
            server,
            users,
            ddl,
            password_stdin,
            settings: s,
            json,
        } => {
            if ddl && !tier.rules().ddl {
                return Err(Failure(
                    format!("tenant \"{id}\" is of the row tier: its tables are shared with other tenants, so their schema changes only through `pgtenant migrate`"),
                    1,
                ));
            }
            let users = if users.is_empty() {
                vec!["app".to_string()]
            } else {
                users
            };
            if let Some(u) = users
                .iter()
                .find(|u| u.contains(cfg.tenant_separator.as_str()))
            {
                return Err(Failure(
                    format!(
                        "client user \"{u}\" contains the tenant separator \"{}\"",
                        cfg.tenant_separator
                    ),
                    1,
                ));
            }
            let (password, generated) = if password_stdin {
                (read_stdin_line("password")?, false)
            } else {
                (provision::random_password(), true)
            };
            let verifier = hash_password(&password);
            let req = CreateRequest {
                id: id.clone(),
                tier,
                server,
                settings: settings(&s)?,
                users: users
                    .iter()
                    .map(|u| (u.clone(), verifier.clone()))
                    .collect(),
            };
            let record = provision::create(&store, &req, &migrations(&store)?).await?;
            if ddl {
                let role = provision::grant_ddl(&store, &id).await?;
                for u in &users {
                    store
                        .put_user(&id, u, &verifier, &role, false, Default::default())
                        .await?;
                }
            }
            if json {
                let mut v = serde_json::to_value(&record)?;
                if generated {
                    v["generated_password"] = serde_json::Value::String(password.clone());
                }
                println!("{}", output::json(&v));
            } else {
                println!(
                    "tenant {id} created ({} tier on server {}, database {})",
                    tier.as_str(),
                    record.server,
                    record.database
                );
                for u in &users {
                    let login = format!("{u}{}{id}", cfg.tenant_separator);
                    if generated {
                        println!("  user {login}  password {password}  (shown once; store it now)");
                    } else {
                        println!("  user {login}");
                    }
                }
            }
        }
        TenantCmd::List { json } => {
            let rows = store.tenant_rows(None).await?;
            let versions = migration_versions(&store).await?;
            if json {
                println!("{}", output::json(&rows));
            } else {
                println!(
                    "{}",
                    output::table(
                        &[
                            "id",
                            "tier",
                            "server",
                            "database",
                            "schema",
                            "status",
                            "pool",
                            "users",
                            "migration",
                            "updated"
                        ],
                        rows.iter()
                            .map(|r| {
                                let t = &r.tenant;
                                vec![
                                    t.id.clone(),
                                    t.tier.clone(),
                                    t.server.clone(),
                                    t.database.clone(),
                                    output::opt(&t.schema),
                                    status_label(r),
                                    t.pool_size.map(|n| n.to_string()).unwrap_or_else(|| {
                                        format!("{} (default)", cfg.pool.default_size)
                                    }),
                                    r.users
                                        .iter()
                                        .map(|u| u.name.clone())
                                        .collect::<Vec<_>>()
                                        .join(", "),
                                    versions
                                        .get(&t.id)
                                        .map(|v| format!("V{v}"))
                                        .unwrap_or_else(|| "-".into()),
                                    t.updated_at.clone(),
                                ]
                            })
                            .collect()
                    )
                );
            }
        }
        TenantCmd::Show { id, json } => {
            let rows = store.tenant_rows(Some(&[id.as_str()])).await?;
            let r = rows.into_iter().next().ok_or_else(|| {
                Failure(format!("tenant \"{id}\" does not exist in the registry"), 1)
            })?;
            if json {
                println!("{}", output::json(&r));
            } else {
                println!("{}", show(&r));
            }
        }
        TenantCmd::Update {
            id,
            settings: s,
            rotate_password,
            user,
            read_only,
            ddl,
            auth,
            user_session_features,
            json,
        } => {
            let s = settings(&s)?;
            store.update_settings(&id, &s).await?;
            for pair in &user_session_features {
                let (name, features) = user_features(pair)?;
                store.set_user_session_features(&id, name, features).await?;
            }
            if rotate_password {
                provision::rotate_role_password(&store, &id).await?;
            }
            if let Some(u) = user {
                let auth = auth.unwrap_or_default();
                // A certificate-only user has no password: its verifier is of a random one.
                let pw = if auth.needs_password() {
                    read_stdin_line("password")?
                } else {
                    provision::random_password()
                };
                let role = if ddl {
                    provision::grant_ddl(&store, &id).await?
                } else {
                    provision::role_of(&store, &id).await?
                };
                store
                    .put_user(&id, &u, &hash_password(&pw), &role, read_only, auth)
                    .await?;
            }
            let rows = store.tenant_rows(Some(&[id.as_str()])).await?;
            if let Some(r) = rows.first() {
                if json {
                    println!("{}", output::json(r));
                } else {
                    println!("tenant {id} updated");
                }
            }
        }
        TenantCmd::Suspend { id, terminate } => {
            store
                .set_status(&id, TenantStatus::Suspended, terminate)
                .await?;
            println!(
                "tenant {id} suspended{}",
                if terminate {
                    "; its connections are being closed"
                } else {
                    ""
                }
            );
        }
        TenantCmd::Resume { id } => {
            store.set_status(&id, TenantStatus::Active, false).await?;
            println!("tenant {id} resumed");
        }
        TenantCmd::Delete { id, keep_data } => {
            provision::delete(&store, &id, keep_data).await?;
            if keep_data {
                println!("tenant {id} suspended; its data is kept");
            } else {
                println!("tenant {id} deleted with all its data");
            }
        }
        TenantCmd::RenameObjects { id, all, json } => {
            let ids = match id {
                Some(id) if !all => vec![id],
                _ => store
                    .tenant_rows(None)
                    .await?
                    .into_iter()
                    .map(|r| r.tenant.id)
                    .collect(),
            };
            let mut reports = Vec::new();
            for id in &ids {
                let r = crate::tenancy::rename::rename_objects(&store, id).await?;
                if !json {
                    println!("{}", rename_line(&r));
                }
                reports.push(r);
            }
            if json {
                println!("{}", output::json(&reports));
            }
        }
        TenantCmd::Dump { id, output: path } => match path {
            Some(p) => {
                let mut f = std::fs::File::create(&p)
                    .map_err(|e| Failure(format!("cannot create {}: {e}", p.display()), 1))?;
                crate::tenancy::dump::dump(&store, &id, &mut f).await?;
                eprintln!("tenant {id} dumped to {}", p.display());
            }
            None => {
                let mut out = std::io::stdout();
                crate::tenancy::dump::dump(&store, &id, &mut out).await?;
            }
        },
    }
    Ok(())
}

/// `NAME=pin|refuse|tenant` of `--user-session-features`.
fn user_features(pair: &str) -> Result<(&str, Option<crate::config::SessionFeatures>), Failure> {
    let bad = || {
        Failure(
            format!(
                "--user-session-features {pair}: expected NAME=pin, NAME=refuse or NAME=tenant"
            ),
            2,
        )
    };
    let (name, mode) = pair.split_once('=').ok_or_else(bad)?;
    let features = match mode {
        "tenant" => None,
        m => Some(parse_session_features(m).map_err(|_| bad())?),
    };
    Ok((name, features))
}

fn rename_line(r: &crate::tenancy::rename::RenameReport) -> String {
    let mut line = if r.renamed.is_empty() {
        format!("tenant {}: its names are opaque already", r.tenant)
    } else {
        let parts: Vec<String> = r
            .renamed
            .iter()
            .map(|x| format!("{} {} → {}", x.kind, x.from, x.to))
            .collect();
        format!("tenant {}: {}", r.tenant, parts.join("; "))
    };
    if r.left_suspended {
        line.push_str(" (it was suspended and stays so: `tenant resume` serves it again)");
    }
    line
}

fn status_label(r: &TenantRows) -> String {
    if r.tenant.provisioned {
        r.tenant.status.clone()
    } else {
        format!("{} (provisioning unfinished)", r.tenant.status)
    }
}

async fn migration_versions(
    store: &RegistryStore,
) -> Result<std::collections::HashMap<String, i64>, Failure> {
    Ok(store
        .client
        .query(
            "SELECT tenant_id, max(version) FROM pgtenant.migrations GROUP BY 1",
            &[],
        )
        .await
        .map_err(crate::tenancy::store::RegistryError::from)?
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect())
}

fn show(r: &TenantRows) -> String {
    let t = &r.tenant;
    let kv = vec![
        ("id", t.id.clone()),
        ("display name", output::opt(&t.display_name)),
        ("tier", t.tier.clone()),
        ("server", t.server.clone()),
        ("database", t.database.clone()),
        ("schema", output::opt(&t.schema)),
        (
            "replicas",
            if t.replicas.is_empty() {
                "-".into()
            } else {
                t.replicas.join(", ")
            },
        ),
        ("read/write split", t.read_write_split.to_string()),
        ("replica fallback", t.replica_fallback.to_string()),
        ("slow transaction ms", output::opt(&t.slow_transaction_ms)),
        ("require TLS", t.require_tls.to_string()),
        ("weight", t.weight.unwrap_or(1).to_string()),
        (
            "session features",
            t.session_features
                .clone()
                .unwrap_or_else(|| "(proxy default)".into()),
        ),
        ("status", status_label(r)),
        ("auto update", t.auto_update.to_string()),
        ("pool size", output::opt(&t.pool_size)),
        ("pool min idle", output::opt(&t.pool_min_idle)),
        ("pool mode", output::opt(&t.pool_mode)),
        ("query wait timeout", output::opt(&t.query_wait_timeout)),
        ("server idle timeout", output::opt(&t.server_idle_timeout)),
        (
            "max client connections",
            output::opt(&t.max_client_connections),
        ),
        ("params", joined(&t.params, "=")),
        ("limits", joined(&t.limits, "<=")),
        (
            "backend roles",
            r.backend_roles
                .iter()
                .map(|b| format!("{} (password encrypted)", b.name))
                .collect::<Vec<_>>()
                .join(", "),
        ),
        (
            "client users",
            r.users
                .iter()
                .map(|u| {
                    let ro = if u.read_only { " (read-only)" } else { "" };
                    let auth = if u.auth == "scram" {
                        String::new()
                    } else {
                        format!(" (auth {})", u.auth)
                    };
                    let features = match &u.session_features {
                        Some(f) => format!(" (session features {f})"),
                        None => String::new(),
                    };
                    format!("{} → {}{ro}{auth}{features}", u.name, u.backend_role)
                })
                .collect::<Vec<_>>()
                .join(", "),
        ),
        ("created", t.created_at.clone()),
        ("updated", t.updated_at.clone()),
    ];
    output::table(
        &["field", "value"],
        kv.into_iter()
            .map(|(k, v)| vec![k.to_string(), v])
            .collect(),
    )
}

/// `pgtenant admin`: admin console users kept in the registry (beside the config's).
pub async fn admin_cmd(cmd: AdminCmd, config: &Path) -> Result<(), Failure> {
    let (_, store) = open(config).await?;
    match cmd {
        AdminCmd::Add { name } => {
            if name.is_empty() || name.contains('.') {
                return Err(ProvisionError::Invalid(
                    "an admin user name must be non-empty and contain no '.'".into(),
                )
                .into());
            }
            let pw = read_stdin_line("password")?;
            store.put_admin_user(&name, &hash_password(&pw)).await?;
            println!("admin user {name} stored (as a SCRAM verifier)");
        }
        AdminCmd::Remove { name } => {
            if !store.remove_admin_user(&name).await? {
                return Err(ProvisionError::Invalid(format!("no admin user \"{name}\"")).into());
            }
            println!("admin user {name} removed");
        }
        AdminCmd::List { json } => {
            let names: Vec<String> = store
                .admin_users()
                .await?
                .into_iter()
                .map(|(n, _)| n)
                .collect();
            if json {
                println!("{}", output::json(&names));
            } else {
                println!(
                    "{}",
                    output::table(
                        &["admin user"],
                        names.into_iter().map(|n| vec![n]).collect()
                    )
                );
            }
        }
    }
    Ok(())
}

#[derive(Args, Debug)]
pub struct UsageArgs {
    /// Hours from this time on (e.g. 2026-11-01, or "2026-11-27 09:00"); default: all.
    #[arg(long)]
    pub since: Option<String>,
    /// One tenant only.
    #[arg(long)]
    pub tenant: Option<String>,
    /// Comma-separated values with a header line, for spreadsheets and billing.
    #[arg(long, conflicts_with = "json")]
    pub csv: bool,
    #[arg(long)]
    pub json: bool,
}

/// `pgtenant usage`: hourly usage per tenant from the registry, summed over all proxies.
pub async fn usage_cmd(args: UsageArgs, config: &Path) -> Result<(), Failure> {
    let (_, store) = open(config).await?;
    let rows =
        crate::admin::usage::read(&store, args.since.as_deref(), args.tenant.as_deref()).await?;
    const HEADERS: [&str; 8] = [
        "tenant",
        "hour (UTC)",
        "transactions",
        "queries",
        "server_busy_us",
        "bytes_in",
        "bytes_out",
        "client_connection_seconds",
    ];
    let cells = |r: &crate::admin::usage::UsageRow| {
        let u = &r.usage;
        vec![
            r.tenant.clone(),
            r.hour.clone(),
            u.transactions.to_string(),
            u.queries.to_string(),
            u.server_busy_us.to_string(),
            u.bytes_in.to_string(),
            u.bytes_out.to_string(),
            u.client_connection_seconds.to_string(),
        ]
    };
    if args.json {
        println!("{}", output::json(&rows));
    } else if args.csv {
        println!("{}", HEADERS.join(",").replace("hour (UTC)", "hour_utc"));
        for r in &rows {
            println!("{}", cells(r).join(","));
        }
    } else {
        println!(
            "{}",
            output::table(&HEADERS, rows.iter().map(cells).collect())
        );
    }
    Ok(())
}

pub async fn migrate_cmd(args: MigrateArgs, config: &Path) -> Result<(), Failure> {
    let (_, store) = open(config).await?;
    let migs = migrations(&store)?;
    if store.cfg.migrations.is_none() {
        return Err(Failure(
            "registry.migrations is not set: no migration directory to apply".into(),
            2,
        ));
    }
    let n = args.concurrency.unwrap_or(store.cfg.migrate_concurrency);
    let progress = !args.json && std::io::IsTerminal::is_terminal(&std::io::stderr());
    let outcomes = migrate::run(&store, &migs, n, args.dry_run, progress).await?;
    if args.json {
        println!("{}", output::json(&outcomes));
    } else {
        println!("{}", migrate::render(&outcomes, args.dry_run));
    }
    if outcomes.iter().any(|o| o.error.is_some()) {
        return Err(Failure(
            "some tenants failed to migrate (see the table)".into(),
            1,
        ));
    }
    Ok(())
}

/// `k1=v1, k2=v2` of a settings map, with `op` between name and value.
fn joined(map: &std::collections::BTreeMap<String, String>, op: &str) -> String {
    map.iter()
        .map(|(k, v)| format!("{k}{op}{v}"))
        .collect::<Vec<_>>()
        .join(", ")
}
