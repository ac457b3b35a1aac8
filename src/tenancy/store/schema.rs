//! The registry's own tables, created and upgraded by pgtenant. Each entry of `STEPS` moves the
//! schema one version up; applied steps are recorded in `pgtenant.schema_version`.

/// Notification channel every registry change is announced on.
pub const CHANNEL: &str = "pgtenant_registry";

pub const STEPS: &[&str] = &[
    // 1: servers, tenants, their roles and users, migration records, change notifications.
    r#"
CREATE TABLE pgtenant.servers (
    name            text PRIMARY KEY CHECK (name ~ '^[a-z0-9][a-z0-9_-]{0,62}$'),
    host            text NOT NULL,
    port            integer NOT NULL CHECK (port BETWEEN 1 AND 65535),
    admin_user      text NOT NULL,
    -- sealed by pgtenant (AES-256-GCM, "pgt1$<key id>$..."), never clear text
    admin_password  text CHECK (admin_password IS NULL OR admin_password LIKE 'pgt1$%'),
    created_at      timestamptz NOT NULL DEFAULT now(),
    updated_at      timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE pgtenant.tenants (
    id                      text PRIMARY KEY CHECK (id ~ '^[a-z0-9][a-z0-9_-]{0,62}$'),
    display_name            text,
    tier                    text NOT NULL CHECK (tier IN ('database', 'schema', 'row')),
    server                  text NOT NULL REFERENCES pgtenant.servers (name),
    database                text NOT NULL,
    schema                  text,
    replicas                text[] NOT NULL DEFAULT '{}',
    params                  jsonb NOT NULL DEFAULT '{}',
    pool_size               integer CHECK (pool_size > 0),
    pool_min_idle           integer CHECK (pool_min_idle >= 0),
    pool_mode               text CHECK (pool_mode IN ('session', 'transaction')),
    query_wait_timeout      integer CHECK (query_wait_timeout > 0),
    server_idle_timeout     integer CHECK (server_idle_timeout > 0),
    max_client_connections  integer CHECK (max_client_connections >= 0),
    status                  text NOT NULL DEFAULT 'active'
                                CHECK (status IN ('active', 'suspended', 'deleted')),
    -- false until `tenant create` has finished every step; such a tenant is not served
    provisioned             boolean NOT NULL DEFAULT false,
    auto_update             boolean NOT NULL DEFAULT true,
    -- bumped to make every proxy close this tenant's client connections
    terminate_generation    bigint NOT NULL DEFAULT 0,
    created_at              timestamptz NOT NULL DEFAULT now(),
    updated_at              timestamptz NOT NULL DEFAULT now(),
    CHECK ((tier = 'schema') = (schema IS NOT NULL))
);

CREATE TABLE pgtenant.backend_roles (
    tenant_id   text NOT NULL REFERENCES pgtenant.tenants (id) ON DELETE CASCADE,
    name        text NOT NULL,
    password    text NOT NULL CHECK (password LIKE 'pgt1$%'),
    PRIMARY KEY (tenant_id, name)
);

CREATE TABLE pgtenant.client_users (
    tenant_id     text NOT NULL REFERENCES pgtenant.tenants (id) ON DELETE CASCADE,
    name          text NOT NULL,
    scram         text NOT NULL CHECK (scram LIKE 'SCRAM-SHA-256$%'),
    backend_role  text NOT NULL,
    PRIMARY KEY (tenant_id, name),
    FOREIGN KEY (tenant_id, backend_role) REFERENCES pgtenant.backend_roles (tenant_id, name)
        ON DELETE CASCADE
);

CREATE TABLE pgtenant.migrations (
    tenant_id   text NOT NULL REFERENCES pgtenant.tenants (id) ON DELETE CASCADE,
    version     bigint NOT NULL,
    name        text NOT NULL,
    checksum    text NOT NULL,
    applied_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant_id, version)
);

CREATE FUNCTION pgtenant.touch() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    NEW.updated_at := now();
    RETURN NEW;
END $$;

CREATE TRIGGER touch BEFORE UPDATE ON pgtenant.servers
    FOR EACH ROW EXECUTE FUNCTION pgtenant.touch();
CREATE TRIGGER touch BEFORE UPDATE ON pgtenant.tenants
    FOR EACH ROW EXECUTE FUNCTION pgtenant.touch();

-- Payload "tenant:<id>" or "server:<name>"; proxies reload what it names.
CREATE FUNCTION pgtenant.announce() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    r record := COALESCE(NEW, OLD);
BEGIN
    IF TG_TABLE_NAME = 'servers' THEN
        PERFORM pg_notify('pgtenant_registry', 'server:' || r.name);
    ELSIF TG_TABLE_NAME = 'tenants' THEN
        PERFORM pg_notify('pgtenant_registry', 'tenant:' || r.id);
    ELSE
        PERFORM pg_notify('pgtenant_registry', 'tenant:' || r.tenant_id);
    END IF;
    RETURN NULL;
END $$;

CREATE TRIGGER announce AFTER INSERT OR UPDATE OR DELETE ON pgtenant.servers
    FOR EACH ROW EXECUTE FUNCTION pgtenant.announce();
CREATE TRIGGER announce AFTER INSERT OR UPDATE OR DELETE ON pgtenant.tenants
    FOR EACH ROW EXECUTE FUNCTION pgtenant.announce();
CREATE TRIGGER announce AFTER INSERT OR UPDATE OR DELETE ON pgtenant.backend_roles
    FOR EACH ROW EXECUTE FUNCTION pgtenant.announce();
CREATE TRIGGER announce AFTER INSERT OR UPDATE OR DELETE ON pgtenant.client_users
    FOR EACH ROW EXECUTE FUNCTION pgtenant.announce();
"#,
    // 2: per-tenant caps on settings (`tenancy::limits`).
    r#"
ALTER TABLE pgtenant.tenants ADD COLUMN limits jsonb NOT NULL DEFAULT '{}';
"#,
    // 3: read routing: read/write split and primary fallback per tenant, read-only users.
    r#"
ALTER TABLE pgtenant.tenants
    ADD COLUMN read_write_split boolean NOT NULL DEFAULT false,
    ADD COLUMN replica_fallback boolean NOT NULL DEFAULT true;
ALTER TABLE pgtenant.client_users ADD COLUMN read_only boolean NOT NULL DEFAULT false;
-- Dropped by step 12, once the row context worked on a hot standby.
ALTER TABLE pgtenant.tenants ADD CONSTRAINT row_tier_tenants_read_from_their_primary
    CHECK (tier <> 'row' OR replicas = '{}') NOT VALID;
"#,
    // 4: usage per tenant, hourly, one row per proxy instance (summed on read).
    r#"
CREATE TABLE pgtenant.tenant_usage (
    instance                   text NOT NULL,
    tenant_id                  text NOT NULL,
    hour                       timestamptz NOT NULL,
    transactions               bigint NOT NULL DEFAULT 0,
    queries                    bigint NOT NULL DEFAULT 0,
    server_busy_us             bigint NOT NULL DEFAULT 0,
    bytes_in                   bigint NOT NULL DEFAULT 0,
    bytes_out                  bigint NOT NULL DEFAULT 0,
    client_connection_seconds  bigint NOT NULL DEFAULT 0,
    PRIMARY KEY (instance, tenant_id, hour)
);
CREATE INDEX tenant_usage_hour ON pgtenant.tenant_usage (hour, tenant_id);
"#,
    // 5: admin console users kept in the registry.
    r#"
CREATE TABLE pgtenant.admin_users (
    name        text PRIMARY KEY CHECK (name <> '' AND position('.' IN name) = 0),
    scram       text NOT NULL CHECK (scram LIKE 'SCRAM-SHA-256$%'),
    created_at  timestamptz NOT NULL DEFAULT now()
);

CREATE OR REPLACE FUNCTION pgtenant.announce() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    r record := COALESCE(NEW, OLD);
BEGIN
    IF TG_TABLE_NAME = 'servers' THEN
        PERFORM pg_notify('pgtenant_registry', 'server:' || r.name);
    ELSIF TG_TABLE_NAME = 'tenants' THEN
        PERFORM pg_notify('pgtenant_registry', 'tenant:' || r.id);
    ELSIF TG_TABLE_NAME = 'admin_users' THEN
        PERFORM pg_notify('pgtenant_registry', 'admin:' || r.name);
    ELSE
        PERFORM pg_notify('pgtenant_registry', 'tenant:' || r.tenant_id);
    END IF;
    RETURN NULL;
END $$;

CREATE TRIGGER announce AFTER INSERT OR UPDATE OR DELETE ON pgtenant.admin_users
    FOR EACH ROW EXECUTE FUNCTION pgtenant.announce();
"#,
    // 6: a tenant's own slow-transaction threshold.
    r#"
ALTER TABLE pgtenant.tenants ADD COLUMN slow_transaction_ms integer
    CHECK (slow_transaction_ms >= 0);
"#,
    // 7: TLS to each server, as libpq's sslmode; the files are paths on the proxies' hosts.
    r#"
ALTER TABLE pgtenant.servers
    ADD COLUMN sslmode text NOT NULL DEFAULT 'prefer'
        CHECK (sslmode IN ('disable', 'prefer', 'require', 'verify-ca', 'verify-full')),
    ADD COLUMN sslrootcert text,
    ADD COLUMN sslcert text,
    ADD COLUMN sslkey text;
"#,
    // 8: secrets of the deployment itself, sealed like every other; the row tier's secret is
    // kept here so that rotating the master key does not change it.
    r#"
CREATE TABLE pgtenant.secrets (
    name    text PRIMARY KEY,
    value   text NOT NULL CHECK (value LIKE 'pgt1$%')
);
"#,
    // 9: front-door rules: a tenant may require TLS; a client user's way to authenticate.
    r#"
ALTER TABLE pgtenant.tenants ADD COLUMN require_tls boolean NOT NULL DEFAULT false;
ALTER TABLE pgtenant.client_users ADD COLUMN auth text NOT NULL DEFAULT 'scram'
    CHECK (auth IN ('scram', 'scram-plus', 'cert', 'scram+cert'));
"#,
    // 10: transaction mode's answer to session features, per tenant (NULL: the proxy's [pool]).
    r#"
ALTER TABLE pgtenant.tenants ADD COLUMN session_features text
    CHECK (session_features IN ('pin', 'refuse'));
"#,
    // 11: many tenants on few servers: a tenant's weight in its server's budget, and a
    // server's budget (NULL: read from the server).
    r#"
ALTER TABLE pgtenant.tenants ADD COLUMN weight integer CHECK (weight > 0);
ALTER TABLE pgtenant.servers ADD COLUMN max_connections integer CHECK (max_connections > 0);
"#,
    // 12: row tenants may read from replicas: their context is made of session settings now.
    r#"
ALTER TABLE pgtenant.tenants DROP CONSTRAINT IF EXISTS row_tier_tenants_read_from_their_primary;
"#,
    // 13: a client user's own answer to session features (NULL: its tenant's).
    r#"
ALTER TABLE pgtenant.client_users ADD COLUMN session_features text
    CHECK (session_features IN ('pin', 'refuse'));
"#,
];
