//! Registry rows, read and written as they are stored (passwords sealed), and the conversion to
//! the in-memory `Tenant` the proxy serves.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use serde::Serialize;
use tokio_postgres::Row;

use crate::config::{PoolConfig, PoolMode, TenantStatus, Tier};
use crate::credentials::ScramVerifier;
use crate::tenancy::crypto::{role_owner, secret_owner, server_owner, Keyring};
use crate::tenancy::model::{ClientUser, Server, Tenant};

use super::{RegistryError, RegistryStore};

#[derive(Debug, Clone, Serialize)]
pub struct ServerRecord {
    pub name: String,
    pub host: String,
    pub port: u16,
    pub admin_user: String,
    /// Sealed; never clear text.
    #[serde(skip)]
    pub admin_password: Option<String>,
    /// libpq's sslmode and files for every connection to the server.
    pub tls: crate::config::BackendTlsConfig,
    /// Its connection budget; None: read from the server.
    pub max_connections: Option<i32>,
    pub created_at: String,
    pub updated_at: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct TenantRecord {
    pub id: String,
    pub display_name: Option<String>,
    pub tier: String,
    pub server: String,
    pub database: String,
    pub schema: Option<String>,
    pub replicas: Vec<String>,
    pub params: BTreeMap<String, String>,
    pub limits: BTreeMap<String, String>,
    pub read_write_split: bool,
    pub replica_fallback: bool,
    pub slow_transaction_ms: Option<i32>,
    /// Its clients must connect with TLS.
    pub require_tls: bool,
    /// `pin` or `refuse`; None: the proxy's `[pool] session_features`.
    pub session_features: Option<String>,
    /// Its share of a full server budget (None: 1).
    pub weight: Option<i32>,
    pub pool_size: Option<i32>,
    pub pool_min_idle: Option<i32>,
    pub pool_mode: Option<String>,
    pub query_wait_timeout: Option<i32>,
    pub server_idle_timeout: Option<i32>,
    pub max_client_connections: Option<i32>,
    pub status: String,
    pub provisioned: bool,
    pub auto_update: bool,
    pub terminate_generation: i64,
    pub created_at: String,
    pub updated_at: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct RoleRecord {
    pub name: String,
    /// Sealed; never clear text.
    #[serde(skip)]
    pub password: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct UserRecord {
    pub name: String,
    /// A SCRAM verifier: not a password, but no reason to print it either.
    #[serde(skip)]
    pub scram: String,
    pub backend_role: String,
    /// Its sessions read from the tenant's replicas and are read-only.
    pub read_only: bool,
    /// `scram`, `scram-plus`, `cert` or `scram+cert`.
    pub auth: String,
    /// `pin` or `refuse`; None: its tenant's.
    pub session_features: Option<String>,
}

/// A tenant row with its roles and users.
#[derive(Debug, Clone, Serialize)]
pub struct TenantRows {
    #[serde(flatten)]
    pub tenant: TenantRecord,
    pub backend_roles: Vec<RoleRecord>,
    pub users: Vec<UserRecord>,
}

const TENANT_COLUMNS: &str = "id, display_name, tier, server, database, schema, replicas,
    params::text, pool_size, pool_min_idle, pool_mode, query_wait_timeout, server_idle_timeout,
    max_client_connections, status, provisioned, auto_update, terminate_generation,
    to_char(created_at, 'YYYY-MM-DD HH24:MI:SSOF'), to_char(updated_at, 'YYYY-MM-DD HH24:MI:SSOF'),
    limits::text, read_write_split, replica_fallback, slow_transaction_ms, require_tls,
    session_features, weight";

fn tenant_from_row(r: &Row) -> TenantRecord {
    let params: String = r.get(7);
    TenantRecord {
        id: r.get(0),
        display_name: r.get(1),
        tier: r.get(2),
        server: r.get(3),
        database: r.get(4),
        schema: r.get(5),
        replicas: r.get(6),
        params: serde_json::from_str(&params).unwrap_or_default(),
        limits: serde_json::from_str(&r.get::<_, String>(20)).unwrap_or_default(),
        read_write_split: r.get(21),
        replica_fallback: r.get(22),
        slow_transaction_ms: r.get(23),
        require_tls: r.get(24),
        session_features: r.get(25),
        weight: r.get(26),
        pool_size: r.get(8),
        pool_min_idle: r.get(9),
        pool_mode: r.get(10),
        query_wait_timeout: r.get(11),
        server_idle_timeout: r.get(12),
        max_client_connections: r.get(13),
        status: r.get(14),
        provisioned: r.get(15),
        auto_update: r.get(16),
        terminate_generation: r.get(17),
        created_at: r.get(18),
        updated_at: r.get(19),
    }
}

fn server_from_row(r: &Row) -> ServerRecord {
    ServerRecord {
        name: r.get(0),
        host: r.get(1),
        port: r.get::<_, i32>(2) as u16,
        admin_user: r.get(3),
        admin_password: r.get(4),
        created_at: r.get(5),
        updated_at: r.get(6),
        max_connections: r.get(11),
        tls: crate::config::BackendTlsConfig {
            sslmode: crate::config::SslMode::parse(r.get(7)),
            sslrootcert: r.get::<_, Option<String>>(8).map(Into::into),
            sslcert: r.get::<_, Option<String>>(9).map(Into::into),
            sslkey: r.get::<_, Option<String>>(10).map(Into::into),
        },
    }
}

const SERVER_COLUMNS: &str = "name, host, port, admin_user, admin_password,
    to_char(created_at, 'YYYY-MM-DD HH24:MI:SSOF'), to_char(updated_at, 'YYYY-MM-DD HH24:MI:SSOF'),
    sslmode, sslrootcert, sslcert, sslkey, max_connections";

/// A server to register (`put_server`).
#[derive(Debug, Clone, Copy)]
pub struct NewServer<'a> {
    pub name: &'a str,
    pub host: &'a str,
    pub port: u16,
    pub admin_user: &'a str,
    pub admin_password: Option<&'a str>,
    pub tls: &'a crate::config::BackendTlsConfig,
    /// Its connection budget; None: read from the server.
    pub max_connections: Option<i32>,
}

/// New values for a tenant's pool and limits; None leaves a field as it is.
#[derive(Debug, Default, Clone)]
pub struct TenantSettings {
    pub display_name: Option<String>,
    pub pool_size: Option<i32>,
    pub pool_min_idle: Option<i32>,
    pub pool_mode: Option<PoolMode>,
    pub query_wait_timeout: Option<i32>,
    pub server_idle_timeout: Option<i32>,
    pub max_client_connections: Option<i32>,
    pub auto_update: Option<bool>,
    pub params: Option<BTreeMap<String, String>>,
    pub limits: Option<BTreeMap<String, String>>,
    pub replicas: Option<Vec<String>>,
    pub read_write_split: Option<bool>,
    pub replica_fallback: Option<bool>,
    pub slow_transaction_ms: Option<i32>,
    pub require_tls: Option<bool>,
    pub session_features: Option<crate::config::SessionFeatures>,
    pub weight: Option<i32>,
}

impl RegistryStore {
    pub async fn servers(&self) -> Result<Vec<ServerRecord>, RegistryError> {
        let rows = self
            .client
            .query(
                &format!("SELECT {SERVER_COLUMNS} FROM pgtenant.servers ORDER BY name"),
                &[],
            )
            .await?;
        Ok(rows.iter().map(server_from_row).collect())
    }

    pub async fn server(&self, name: &str) -> Result<ServerRecord, RegistryError> {
        let row = self
            .client
            .query_opt(
                &format!("SELECT {SERVER_COLUMNS} FROM pgtenant.servers WHERE name = $1"),
                &[&name],
            )
            .await?
            .ok_or_else(|| RegistryError::NotFound {
                kind: "server",
                id: name.to_string(),
            })?;
        Ok(server_from_row(&row))
    }

    /// Adds or updates a server; its admin password is sealed before it leaves this process.
    pub async fn put_server(&self, s: &NewServer<'_>) -> Result<(), RegistryError> {
        let NewServer {
            name,
            host,
            port,
            admin_user,
            admin_password,
            tls,
            max_connections,
        } = *s;
        let sealed = admin_password.map(|p| self.keys.seal(&server_owner(name), p));
        let path = |p: &Option<std::path::PathBuf>| p.as_ref().map(|p| p.display().to_string());
        self.client
            .execute(
                "INSERT INTO pgtenant.servers (name, host, port, admin_user, admin_password,
                     sslmode, sslrootcert, sslcert, sslkey, max_connections)
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)
                 ON CONFLICT (name) DO UPDATE SET host = EXCLUDED.host, port = EXCLUDED.port,
                     admin_user = EXCLUDED.admin_user, admin_password = EXCLUDED.admin_password,
                     sslmode = EXCLUDED.sslmode, sslrootcert = EXCLUDED.sslrootcert,
                     sslcert = EXCLUDED.sslcert, sslkey = EXCLUDED.sslkey,
                     max_connections = EXCLUDED.max_connections",
                &[
                    &name,
                    &host,
                    &(port as i32),
                    &admin_user,
                    &sealed,
                    &tls.sslmode.unwrap_or_default().as_str(),
                    &path(&tls.sslrootcert),
                    &path(&tls.sslcert),
                    &path(&tls.sslkey),
                    &max_connections,
                ],
            )
            .await?;
        Ok(())
    }

    /// Connection settings for a server's admin role, password opened.
    pub async fn server_admin(
        &self,
        name: &str,
    ) -> Result<(ServerRecord, Option<crate::secret::Secret>), RegistryError> {
        let s = self.server(name).await?;
        let pw = match &s.admin_password {
            Some(sealed) => Some(self.keys.open(&server_owner(name), sealed)?),
            None => None,
        };
        Ok((s, pw))
    }

    pub async fn tenant_record(&self, id: &str) -> Result<Option<TenantRecord>, RegistryError> {
        let row = self
            .client
            .query_opt(
                &format!("SELECT {TENANT_COLUMNS} FROM pgtenant.tenants WHERE id = $1"),
                &[&id],
            )
            .await?;
        Ok(row.as_ref().map(tenant_from_row))
    }

    /// The tenant's record, or NotFound.
    pub async fn tenant(&self, id: &str) -> Result<TenantRecord, RegistryError> {
        self.tenant_record(id)
            .await?
            .ok_or_else(|| RegistryError::no_tenant(id))
    }

    /// Tenants with their roles and users: all of them, or just the ids in `only`.
    pub async fn tenant_rows(
        &self,
        only: Option<&[&str]>,
    ) -> Result<Vec<TenantRows>, RegistryError> {
        let tenants = self
            .client
            .query(
                &format!(
                    "SELECT {TENANT_COLUMNS} FROM pgtenant.tenants
                     WHERE $1::text[] IS NULL OR id = ANY($1) ORDER BY id"
                ),
                &[&only],
            )
            .await?;
        let roles = self
            .client
            .query(
                "SELECT tenant_id, name, password FROM pgtenant.backend_roles
                 WHERE $1::text[] IS NULL OR tenant_id = ANY($1) ORDER BY tenant_id, name",
                &[&only],
            )
            .await?;
        let users = self
            .client
            .query(
                "SELECT tenant_id, name, scram, backend_role, read_only, auth, session_features
                 FROM pgtenant.client_users
                 WHERE $1::text[] IS NULL OR tenant_id = ANY($1) ORDER BY tenant_id, name",
                &[&only],
            )
            .await?;
        let mut by_id: BTreeMap<String, TenantRows> = tenants
            .iter()
            .map(|r| {
                let t = tenant_from_row(r);
                (
                    t.id.clone(),
                    TenantRows {
                        tenant: t,
                        backend_roles: Vec::new(),
                        users: Vec::new(),
                    },
                )
            })
            .collect();
        for r in &roles {
            if let Some(t) = by_id.get_mut(r.get::<_, &str>(0)) {
                t.backend_roles.push(RoleRecord {
                    name: r.get(1),
                    password: r.get(2),
                });
            }
        }
        for r in &users {
            if let Some(t) = by_id.get_mut(r.get::<_, &str>(0)) {
                t.users.push(UserRecord {
                    name: r.get(1),
                    scram: r.get(2),
                    backend_role: r.get(3),
                    read_only: r.get(4),
                    auth: r.get(5),
                    session_features: r.get(6),
                });
            }
        }
        Ok(by_id.into_values().collect())
    }

    /// Refuses replica names that are not registered servers.
    async fn check_replicas(&self, replicas: Option<&Vec<String>>) -> Result<(), RegistryError> {
        let Some(names) = replicas else {
            return Ok(());
        };
        let unknown: Vec<String> = self
            .client
            .query_one(
                "SELECT array(SELECT unnest($1::text[]) EXCEPT SELECT name FROM pgtenant.servers)",
                &[names],
            )
            .await?
            .get(0);
        match unknown.first() {
            Some(n) => Err(RegistryError::Invalid(format!(
                "replica \"{n}\" is not a registered server (add it with `pgtenant server add`)"
            ))),
            None => Ok(()),
        }
    }

    /// Records a new tenant (not yet provisioned), or finds the one a crashed create left.
    /// Returns false when a finished tenant with this id already exists.
    #[allow(clippy::too_many_arguments)]
    pub async fn begin_tenant(
        &self,
        id: &str,
        tier: Tier,
        server: &str,
        database: &str,
        schema: Option<&str>,
        settings: &TenantSettings,
    ) -> Result<bool, RegistryError> {
        self.check_replicas(settings.replicas.as_ref()).await?;
        let params = serde_json::to_string(&settings.params.clone().unwrap_or_default())
            .unwrap_or_else(|_| "{}".into());
        let replicas = settings.replicas.clone().unwrap_or_default();
        let limits = serde_json::to_string(&settings.limits.clone().unwrap_or_default())
            .unwrap_or_else(|_| "{}".into());
        let row = self
            .client
            .query_opt(
                "INSERT INTO pgtenant.tenants (id, display_name, tier, server, database, schema,
                     params, replicas, pool_size, pool_min_idle, pool_mode, query_wait_timeout,
                     server_idle_timeout, max_client_connections, auto_update, limits,
                     read_write_split, replica_fallback, slow_transaction_ms, require_tls,
                     session_features, weight)
                 VALUES ($1, $2, $3, $4, $5, $6, $7::text::jsonb, $8, $9, $10, $11, $12, $13, $14,
                     COALESCE($15, true), $16::text::jsonb, COALESCE($17, false), COALESCE($18, true),
                     $19, COALESCE($20, false), $21, $22)
                 ON CONFLICT (id) DO UPDATE SET id = EXCLUDED.id
                     WHERE NOT pgtenant.tenants.provisioned
                       AND pgtenant.tenants.tier = EXCLUDED.tier
                       AND pgtenant.tenants.server = EXCLUDED.server
                 RETURNING id",
                &[
                    &id,
                    &settings.display_name,
                    &tier.as_str(),
                    &server,
                    &database,
                    &schema,
                    &params,
                    &replicas,
                    &settings.pool_size,
                    &settings.pool_min_idle,
                    &settings.pool_mode.map(pool_mode_str),
                    &settings.query_wait_timeout,
                    &settings.server_idle_timeout,
                    &settings.max_client_connections,
                    &settings.auto_update,
                    &limits,
                    &settings.read_write_split,
                    &settings.replica_fallback,
                    &settings.slow_transaction_ms,
                    &settings.require_tls,
                    &settings.session_features.map(session_features_str),
                    &settings.weight,
                ],
            )
            .await?;
        Ok(row.is_some())
    }

    /// Stores a backend role's password, sealed for (tenant, role).
    pub async fn put_role(
        &self,
        tenant: &str,
        role: &str,
        password: &str,
    ) -> Result<(), RegistryError> {
        let sealed = self.keys.seal(&role_owner(tenant, role), password);
        self.client
            .execute(
                "INSERT INTO pgtenant.backend_roles (tenant_id, name, password) VALUES ($1, $2, $3)
                 ON CONFLICT (tenant_id, name) DO UPDATE SET password = EXCLUDED.password",
                &[&tenant, &role, &sealed],
            )
            .await?;
        Ok(())
    }

    /// The login role recorded for a tenant (None before `tenant create` stored one).
    pub async fn role_name(&self, tenant: &str) -> Result<Option<String>, RegistryError> {
        Ok(self
            .client
            .query_opt(
                "SELECT name FROM pgtenant.backend_roles WHERE tenant_id = $1 ORDER BY name LIMIT 1",
                &[&tenant],
            )
            .await?
            .map(|r| r.get(0)))
    }

    /// Tenants other than `except` on `server` that hold login role `role` (a shared row role).
    pub async fn role_holders(
        &self,
        server: &str,
        role: &str,
        except: &str,
    ) -> Result<Vec<String>, RegistryError> {
        Ok(self
            .client
            .query(
                "SELECT b.tenant_id FROM pgtenant.backend_roles b
                   JOIN pgtenant.tenants t ON t.id = b.tenant_id
                  WHERE b.name = $1 AND t.server = $2 AND b.tenant_id <> $3
                  ORDER BY 1",
                &[&role, &server, &except],
            )
            .await?
            .iter()
            .map(|r| r.get(0))
            .collect())
    }

    /// The opened password of a tenant's backend role.
    pub async fn role_password(
        &self,
        tenant: &str,
        role: &str,
    ) -> Result<Option<crate::secret::Secret>, RegistryError> {
        let row = self
            .client
            .query_opt(
                "SELECT password FROM pgtenant.backend_roles WHERE tenant_id = $1 AND name = $2",
                &[&tenant, &role],
            )
            .await?;
        match row {
            Some(r) => Ok(Some(self.keys.open(&role_owner(tenant, role), r.get(0))?)),
            None => Ok(None),
        }
    }

    pub async fn put_user(
        &self,
        tenant: &str,
        name: &str,
        scram: &str,
        backend_role: &str,
        read_only: bool,
        auth: crate::config::AuthMethod,
    ) -> Result<(), RegistryError> {
        self.client
            .execute(
                "INSERT INTO pgtenant.client_users (tenant_id, name, scram, backend_role, read_only, auth)
                 VALUES ($1, $2, $3, $4, $5, $6)
                 ON CONFLICT (tenant_id, name) DO UPDATE
                     SET scram = EXCLUDED.scram, backend_role = EXCLUDED.backend_role,
                         read_only = EXCLUDED.read_only, auth = EXCLUDED.auth",
                &[&tenant, &name, &scram, &backend_role, &read_only, &auth.as_str()],
            )
            .await?;
        Ok(())
    }

    /// Admin console users: (name, SCRAM verifier).
    pub async fn admin_users(&self) -> Result<Vec<(String, String)>, RegistryError> {
        Ok(self
            .client
            .query(
                "SELECT name, scram FROM pgtenant.admin_users ORDER BY name",
                &[],
            )
            .await?
            .iter()
            .map(|r| (r.get(0), r.get(1)))
            .collect())
    }

    pub async fn put_admin_user(&self, name: &str, scram: &str) -> Result<(), RegistryError> {
        self.client
            .execute(
                "INSERT INTO pgtenant.admin_users (name, scram) VALUES ($1, $2)
                 ON CONFLICT (name) DO UPDATE SET scram = EXCLUDED.scram",
                &[&name, &scram],
            )
            .await?;
        Ok(())
    }

    /// Sets client user `name`'s own answer to session features (None: its tenant's).
    pub async fn set_user_session_features(
        &self,
        tenant: &str,
        name: &str,
        features: Option<crate::config::SessionFeatures>,
    ) -> Result<(), RegistryError> {
        let n = self
            .client
            .execute(
                "UPDATE pgtenant.client_users SET session_features = $3
                 WHERE tenant_id = $1 AND name = $2",
                &[&tenant, &name, &features.map(session_features_str)],
            )
            .await?;
        if n == 0 {
            return Err(RegistryError::NotFound {
                kind: "client user",
                id: format!("{name}.{tenant}"),
            });
        }
        Ok(())
    }

    /// False when there was no such user.
    pub async fn remove_admin_user(&self, name: &str) -> Result<bool, RegistryError> {
        Ok(self
            .client
            .execute("DELETE FROM pgtenant.admin_users WHERE name = $1", &[&name])
            .await?
            > 0)
    }

    pub async fn finish_tenant(&self, id: &str) -> Result<(), RegistryError> {
        self.client
            .execute(
                "UPDATE pgtenant.tenants SET provisioned = true, status = 'active' WHERE id = $1",
                &[&id],
            )
            .await?;
        Ok(())
    }

    /// Sets the status; `terminate` also asks every proxy to close the tenant's clients.
    pub async fn set_status(
        &self,
        id: &str,
        status: TenantStatus,
        terminate: bool,
    ) -> Result<(), RegistryError> {
        let n = self
            .client
            .execute(
                "UPDATE pgtenant.tenants SET status = $2,
                     terminate_generation = terminate_generation + CASE WHEN $3 THEN 1 ELSE 0 END
                 WHERE id = $1",
                &[&id, &status.as_str(), &terminate],
            )
            .await?;
        if n == 0 {
            return Err(RegistryError::no_tenant(id));
        }
        Ok(())
    }

    pub async fn update_settings(&self, id: &str, s: &TenantSettings) -> Result<(), RegistryError> {
        self.check_replicas(s.replicas.as_ref()).await?;
        let params = s
            .params
            .as_ref()
            .map(|p| serde_json::to_string(p).unwrap_or_else(|_| "{}".into()));
        let limits = s
            .limits
            .as_ref()
            .map(|p| serde_json::to_string(p).unwrap_or_else(|_| "{}".into()));
        let n = self
            .client
            .execute(
                "UPDATE pgtenant.tenants SET
                     display_name = COALESCE($2, display_name),
                     pool_size = COALESCE($3, pool_size),
                     pool_min_idle = COALESCE($4, pool_min_idle),
                     pool_mode = COALESCE($5, pool_mode),
                     query_wait_timeout = COALESCE($6, query_wait_timeout),
                     server_idle_timeout = COALESCE($7, server_idle_timeout),
                     max_client_connections = COALESCE($8, max_client_connections),
                     auto_update = COALESCE($9, auto_update),
                     params = COALESCE($10::text::jsonb, params),
                     replicas = COALESCE($11, replicas),
                     limits = COALESCE($12::text::jsonb, limits),
                     read_write_split = COALESCE($13, read_write_split),
                     replica_fallback = COALESCE($14, replica_fallback),
                     slow_transaction_ms = COALESCE($15, slow_transaction_ms),
                     require_tls = COALESCE($16, require_tls),
                     session_features = COALESCE($17, session_features),
                     weight = COALESCE($18, weight)
                 WHERE id = $1",
                &[
                    &id,
                    &s.display_name,
                    &s.pool_size,
                    &s.pool_min_idle,
                    &s.pool_mode.map(pool_mode_str),
                    &s.query_wait_timeout,
                    &s.server_idle_timeout,
                    &s.max_client_connections,
                    &s.auto_update,
                    &params,
                    &s.replicas,
                    &limits,
                    &s.read_write_split,
                    &s.replica_fallback,
                    &s.slow_transaction_ms,
                    &s.require_tls,
                    &s.session_features.map(session_features_str),
                    &s.weight,
                ],
            )
            .await?;
        if n == 0 {
            return Err(RegistryError::no_tenant(id));
        }
        Ok(())
    }

    /// Records that tenant `id`'s objects now have other names on its server: its database,
    /// its schema, and each backend role (old name, new name); a role's password is sealed
    /// again for its new name and the client users follow it. One transaction, so proxies
    /// see the old names or the new ones, never a mix.
    pub async fn rename_objects(
        &self,
        id: &str,
        database: &str,
        schema: Option<&str>,
        roles: &[(String, String)],
    ) -> Result<(), RegistryError> {
        use crate::tenancy::tier::quote_literal as q;
        let mut sql = format!(
            "UPDATE pgtenant.tenants SET database = {}, schema = {} WHERE id = {};",
            q(database),
            schema.map_or_else(|| "NULL".to_string(), q),
            q(id)
        );
        for (old, new) in roles {
            let password = self.role_password(id, old).await?.ok_or_else(|| {
                RegistryError::Invalid(format!("tenant \"{id}\" has no role \"{old}\""))
            })?;
            let sealed = self.keys.seal(&role_owner(id, new), password.expose());
            sql.push_str(&format!(
                "INSERT INTO pgtenant.backend_roles (tenant_id, name, password) VALUES ({t}, {n}, {p})
                     ON CONFLICT (tenant_id, name) DO UPDATE SET password = EXCLUDED.password;
                 UPDATE pgtenant.client_users SET backend_role = {n}
                     WHERE tenant_id = {t} AND backend_role = {o};
                 DELETE FROM pgtenant.backend_roles WHERE tenant_id = {t} AND name = {o};",
                t = q(id),
                n = q(new),
                o = q(old),
                p = q(&sealed)
            ));
        }
        // One simple query is one implicit transaction: all of it or nothing.
        self.client.batch_execute(&sql).await?;
        Ok(())
    }

    pub async fn remove_tenant(&self, id: &str) -> Result<(), RegistryError> {
        self.client
            .execute("DELETE FROM pgtenant.tenants WHERE id = $1", &[&id])
            .await?;
        Ok(())
    }

    /// Re-seals every stored password under the current key. Returns how many were rewritten.
    /// Each row is rewritten in its own statement so proxies reading meanwhile always see a
    /// value one of their keys opens.
    pub async fn rotate_key(&self) -> Result<usize, RegistryError> {
        let current = self.keys.current_id().to_string();
        let mut n = 0;
        for s in self.servers().await? {
            if let Some(sealed) = &s.admin_password {
                if Keyring::key_id_of(sealed) != Some(current.as_str()) {
                    let plain = self.keys.open(&server_owner(&s.name), sealed)?;
                    let resealed = self.keys.seal(&server_owner(&s.name), plain.expose());
                    self.client
                        .execute(
                            "UPDATE pgtenant.servers SET admin_password = $2
                             WHERE name = $1 AND admin_password = $3",
                            &[&s.name, &resealed, sealed],
                        )
                        .await?;
                    n += 1;
                }
            }
        }
        let roles = self
            .client
            .query(
                "SELECT tenant_id, name, password FROM pgtenant.backend_roles",
                &[],
            )
            .await?;
        for r in &roles {
            let (tenant, role, sealed): (&str, &str, &str) = (r.get(0), r.get(1), r.get(2));
            if Keyring::key_id_of(sealed) == Some(current.as_str()) {
                continue;
            }
            let owner = role_owner(tenant, role);
            let plain = self.keys.open(&owner, sealed)?;
            let resealed = self.keys.seal(&owner, plain.expose());
            self.client
                .execute(
                    "UPDATE pgtenant.backend_roles SET password = $3
                     WHERE tenant_id = $1 AND name = $2 AND password = $4",
                    &[&tenant, &role, &resealed, &sealed],
                )
                .await?;
            n += 1;
        }
        let secrets = self
            .client
            .query("SELECT name, value FROM pgtenant.secrets", &[])
            .await?;
        for r in &secrets {
            let (name, sealed): (&str, &str) = (r.get(0), r.get(1));
            if Keyring::key_id_of(sealed) == Some(current.as_str()) {
                continue;
            }
            let owner = secret_owner(name);
            let plain = self.keys.open(&owner, sealed)?;
            let resealed = self.keys.seal(&owner, plain.expose());
            self.client
                .execute(
                    "UPDATE pgtenant.secrets SET value = $2 WHERE name = $1 AND value = $3",
                    &[&name, &resealed, &sealed],
                )
                .await?;
            n += 1;
        }
        Ok(n)
    }

    /// The row tier's secret. The first call seals the one the current master key stands for,
    /// which is what row databases set up before it was stored hold; after that it never
    /// changes, whatever key seals it.
    pub async fn row_secret(&self) -> Result<crate::tenancy::crypto::RowSecret, RegistryError> {
        let text = self
            .deployment_secret("row_secret", self.keys.current_row_secret().to_text())
            .await?;
        crate::tenancy::crypto::RowSecret::from_text(text.expose()).ok_or_else(|| {
            RegistryError::Invalid("the stored row secret is not 32 bytes of base64".into())
        })
    }

    /// The secret provisioning's object names derive from (`tenancy::naming`): random, made by
    /// the first call, and never changed after, so a create run again finds what it made.
    pub async fn naming_key(&self) -> Result<crate::tenancy::naming::NamingKey, RegistryError> {
        let fresh: [u8; 32] = rand::random();
        let text = self
            .deployment_secret("naming_key", B64.encode(fresh))
            .await?;
        let bytes: [u8; 32] = B64
            .decode(text.expose())
            .ok()
            .and_then(|b| b.try_into().ok())
            .ok_or_else(|| {
                RegistryError::Invalid("the stored naming key is not 32 bytes of base64".into())
            })?;
        Ok(crate::tenancy::naming::NamingKey::new(bytes))
    }

    /// A secret of the deployment itself, sealed in `pgtenant.secrets`: `initial` the first
    /// time (by whichever caller gets there first), what is stored after.
    async fn deployment_secret(
        &self,
        name: &str,
        initial: String,
    ) -> Result<crate::secret::Secret, RegistryError> {
        let owner = secret_owner(name);
        let sealed = self.keys.seal(&owner, &initial);
        self.client
            .execute(
                "INSERT INTO pgtenant.secrets (name, value) VALUES ($1, $2)
                 ON CONFLICT (name) DO NOTHING",
                &[&name, &sealed],
            )
            .await?;
        let stored: String = self
            .client
            .query_one(
                "SELECT value FROM pgtenant.secrets WHERE name = $1",
                &[&name],
            )
            .await?
            .get(0);
        Ok(self.keys.open(&owner, &stored)?)
    }

    /// Stored values not yet under the current key.
    pub async fn values_under_old_keys(&self) -> Result<i64, RegistryError> {
        let row = self
            .client
            .query_one(
                "SELECT (SELECT count(*) FROM pgtenant.backend_roles
                         WHERE split_part(password, '$', 2) <> $1)
                      + (SELECT count(*) FROM pgtenant.servers
                         WHERE admin_password IS NOT NULL AND split_part(admin_password, '$', 2) <> $1)
                      + (SELECT count(*) FROM pgtenant.secrets
                         WHERE split_part(value, '$', 2) <> $1)",
                &[&self.keys.current_id()],
            )
            .await?;
        Ok(row.get(0))
    }
}

/// A stored `pin` / `refuse` (anything else: none of its own).
fn parse_session_features(s: Option<&str>) -> Option<crate::config::SessionFeatures> {
    match s {
        Some("pin") => Some(crate::config::SessionFeatures::Pin),
        Some("refuse") => Some(crate::config::SessionFeatures::Refuse),
        _ => None,
    }
}

pub fn session_features_str(f: crate::config::SessionFeatures) -> &'static str {
    match f {
        crate::config::SessionFeatures::Pin => "pin",
        crate::config::SessionFeatures::Refuse => "refuse",
    }
}

pub fn pool_mode_str(m: PoolMode) -> &'static str {
    match m {
        PoolMode::Session => "session",
        PoolMode::Transaction => "transaction",
    }
}

/// What the proxy serves for one registry entry. Credentials that do not open make the tenant
/// unavailable (with the reason logged), never garbage.
pub fn to_tenant(
    rows: &TenantRows,
    servers: &HashMap<String, Arc<Server>>,
    keys: &Keyring,
    pool: &PoolConfig,
) -> Option<Arc<Tenant>> {
    let t = &rows.tenant;
    if !t.provisioned {
        return None;
    }
    let status = TenantStatus::parse(&t.status)?;
    if status == TenantStatus::Deleted {
        return None;
    }
    let tier = Tier::parse(&t.tier)?;
    let server = servers.get(&t.server)?.clone();
    let mut unavailable = None;
    let mut passwords = HashMap::new();
    for r in &rows.backend_roles {
        match keys.open(&role_owner(&t.id, &r.name), &r.password) {
            Ok(p) => {
                passwords.insert(r.name.clone(), p);
            }
            Err(e) => {
                tracing::error!(tenant = %t.id, error = %e, "tenant credentials do not decrypt; tenant unavailable");
                unavailable = Some(
                    "its stored server credentials cannot be decrypted (see the pgtenant log)"
                        .to_string(),
                );
            }
        }
    }
    let mut users = HashMap::new();
    for u in &rows.users {
        let Some(verifier) = ScramVerifier::parse(&u.scram) else {
            tracing::error!(tenant = %t.id, user = %u.name, "client user has an invalid SCRAM verifier; skipped");
            continue;
        };
        let password = passwords.get(&u.backend_role).cloned();
        users.insert(
            u.name.clone(),
            ClientUser::new(&u.name, verifier, &u.backend_role, password)
                .read_only(u.read_only)
                .with_auth(crate::config::AuthMethod::parse(&u.auth).unwrap_or_default())
                .with_session_features(parse_session_features(u.session_features.as_deref())),
        );
    }
    let pool_mode = match t.pool_mode.as_deref() {
        Some("session") => PoolMode::Session,
        Some("transaction") => PoolMode::Transaction,
        _ => pool.mode,
    };
    Some(Arc::new(Tenant {
        id: t.id.clone(),
        display_name: t.display_name.clone(),
        tier,
        server,
        replicas: t
            .replicas
            .iter()
            .filter_map(|r| servers.get(r).cloned())
            .collect(),
        read_write_split: t.read_write_split,
        slow_transaction_ms: t.slow_transaction_ms.map(|n| n.max(0) as u64),
        replica_fallback: t.replica_fallback,
        database: t.database.clone(),
        schema: t.schema.clone(),
        pool_size: t
            .pool_size
            .map(|n| n.max(1) as u32)
            .unwrap_or(pool.default_size),
        min_idle: t.pool_min_idle.map(|n| n.max(0) as u32),
        weight: t.weight.map_or(1, |w| w.max(1) as u32),
        query_wait_timeout: t.query_wait_timeout.map(|n| n as u64),
        server_idle_timeout: t.server_idle_timeout.map(|n| n as u64),
        pool_mode,
        max_client_connections: t.max_client_connections.map(|n| n.max(0) as usize),
        require_tls: t.require_tls,
        session_features: parse_session_features(t.session_features.as_deref())
            .unwrap_or(pool.session_features),
        status,
        params: t
            .params
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect(),
        enforce_limits: crate::tenancy::limits::enforce_statement(&t.limits),
        users,
        unavailable,
    }))
}

/// A registry server's TLS policy; settings this proxy cannot use (an unreadable file) make
/// every connection to it fail with the reason, and are logged.
fn tls_of(s: &ServerRecord) -> crate::tls::BackendTls {
    let tls = crate::tls::BackendTls::build_or_refuse(&s.tls);
    if let Some(e) = tls.setup_error() {
        tracing::error!(server = %s.name, error = %e, "the server's TLS settings cannot be used; its tenants cannot connect");
    }
    tls
}

/// Servers by name, as the tenants refer to them.
pub fn server_map(servers: &[ServerRecord]) -> HashMap<String, Arc<Server>> {
    servers
        .iter()
        .map(|s| {
            (
                s.name.clone(),
                Arc::new(Server {
                    name: s.name.clone(),
                    host: s.host.clone(),
                    port: s.port,
                    tls: tls_of(s),
                    max_connections: s.max_connections.map(|n| n.max(1) as u32),
                }),
            )
        })
        .collect()
}
