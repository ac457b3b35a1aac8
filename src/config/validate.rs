//! Semantic checks that serde cannot express; each error names the offending field.

use std::collections::HashSet;

use super::{Config, ConfigError, TenantConfig, Tier};
use crate::credentials::ScramVerifier;

/// Database name reserved for the admin console.
pub const ADMIN_DATABASE: &str = "pgtenant";

pub fn validate(config: &Config) -> Result<(), ConfigError> {
    let sep = &config.tenant_separator;
    if sep.is_empty() || sep.chars().any(|c| c.is_ascii_alphanumeric() || c == '_') {
        return Err(ConfigError::invalid(
            "tenant_separator",
            "must be non-empty and contain no letters, digits or '_'",
        ));
    }
    if !is_setting_name(&config.row_tenant_setting) || !config.row_tenant_setting.contains('.') {
        return Err(ConfigError::invalid(
            "row_tenant_setting",
            "must be a custom setting name such as \"pgtenant.tenant_id\"",
        ));
    }
    if let Some(k) = &config.row_key {
        if crate::tenancy::crypto::KeySource::parse(k).is_err() {
            return Err(ConfigError::invalid(
                "row_key",
                "must be \"file:PATH\" or \"env:VARIABLE\"",
            ));
        }
    }
    if config.max_message_bytes < 1024 {
        return Err(ConfigError::invalid(
            "max_message_bytes",
            "must be at least 1024",
        ));
    }
    if config.peer_id > super::MAX_PEER_ID {
        return Err(ConfigError::invalid(
            "peer_id",
            format!("must be 0 (alone) or 1 to {}", super::MAX_PEER_ID),
        ));
    }
    let mut peer_ids = HashSet::new();
    for (i, p) in config.peers.iter().enumerate() {
        if p.id == 0 || p.id > super::MAX_PEER_ID {
            return Err(ConfigError::invalid(
                format!("peers[{i}].id"),
                format!("must be 1 to {}", super::MAX_PEER_ID),
            ));
        }
        if p.id == config.peer_id || !peer_ids.insert(p.id) {
            return Err(ConfigError::invalid(
                format!("peers[{i}].id"),
                "must differ from peer_id and from every other peer's",
            ));
        }
    }
    if !config.peers.is_empty() && config.peer_id == 0 {
        return Err(ConfigError::invalid(
            "peer_id",
            "must be set (1 or more) when peers are listed",
        ));
    }
    if config.pool.default_size == 0 {
        return Err(ConfigError::invalid(
            "pool.default_size",
            "must be at least 1",
        ));
    }

    if let Some(r) = &config.registry {
        if r.url.trim().is_empty() {
            return Err(ConfigError::invalid("registry.url", "must not be empty"));
        }
        match r.url.parse::<tokio_postgres::Config>() {
            Err(e) => {
                return Err(ConfigError::invalid(
                    "registry.url",
                    format!("is not a connection string: {e}"),
                ))
            }
            Ok(pg) if pg.get_password().is_some() => {
                return Err(ConfigError::invalid(
                    "registry.url",
                    "must not contain a password; put it in the environment variable named by registry.password_env",
                ))
            }
            Ok(_) => {}
        }
        for (field, k) in std::iter::once(("registry.key".to_string(), &r.key)).chain(
            r.old_keys
                .iter()
                .enumerate()
                .map(|(i, k)| (format!("registry.old_keys[{i}]"), k)),
        ) {
            if let Err(e) = crate::tenancy::crypto::KeySource::parse(k) {
                return Err(ConfigError::invalid(field, e.to_string()));
            }
        }
        if r.migrate_concurrency == 0 {
            return Err(ConfigError::invalid(
                "registry.migrate_concurrency",
                "must be at least 1",
            ));
        }
        for (field, db) in [
            ("registry.schema_database", &r.schema_database),
            ("registry.row_database", &r.row_database),
        ] {
            if !is_schema_name(db) {
                return Err(ConfigError::invalid(
                    field,
                    "must be 1-63 of a-z, 0-9, '_', starting with a letter or '_'",
                ));
            }
        }
        if r.resync_interval == 0 {
            return Err(ConfigError::invalid(
                "registry.resync_interval",
                "must be at least 1 second",
            ));
        }
    }

    let mut servers = HashSet::new();
    for (i, s) in config.servers.iter().enumerate() {
        let field = format!("servers[{i}]");
        if s.max_connections == Some(0) {
            return Err(ConfigError::invalid(
                format!("{field}.max_connections"),
                "must be at least 1",
            ));
        }
        if s.name.is_empty() {
            return Err(ConfigError::invalid(
                format!("{field}.name"),
                "must not be empty",
            ));
        }
        if !servers.insert(s.name.as_str()) {
            return Err(ConfigError::invalid(
                format!("{field}.name"),
                format!("server \"{}\" is defined twice", s.name),
            ));
        }
        if s.host.is_empty() {
            return Err(ConfigError::invalid(
                format!("{field}.host"),
                "must not be empty",
            ));
        }
    }
    for (i, s) in config.servers.iter().enumerate() {
        check_replicas(
            &format!("servers[{i}].replicas"),
            &s.replicas,
            &s.name,
            &servers,
        )?;
    }
    let mut admins = HashSet::new();
    for (i, a) in config.admin.users.iter().enumerate() {
        if a.name.is_empty() || !admins.insert(a.name.as_str()) {
            return Err(ConfigError::invalid(
                format!("admin.users[{i}].name"),
                "must be non-empty and unique",
            ));
        }
        if ScramVerifier::parse(&a.scram).is_none() {
            return Err(ConfigError::invalid(
                format!("admin.users[{i}].scram"),
                "is not a SCRAM-SHA-256 verifier (make one with `pgtenant hash-password`)",
            ));
        }
    }
    if config.health.interval == 0 {
        return Err(ConfigError::invalid(
            "health.interval",
            "must be at least 1 second",
        ));
    }

    let mut tenants = HashSet::new();
    for (i, t) in config.tenants.iter().enumerate() {
        let field = format!("tenants[{i}]");
        if !is_tenant_id(&t.id) || t.id.contains(sep.as_str()) {
            return Err(ConfigError::invalid(
                format!("{field}.id"),
                format!(
                    "\"{}\" is not a valid tenant id (1-63 of a-z, 0-9, '_', '-', starting with a letter or digit)",
                    t.id
                ),
            ));
        }
        if t.id == ADMIN_DATABASE {
            return Err(ConfigError::invalid(
                format!("{field}.id"),
                format!("\"{ADMIN_DATABASE}\" is reserved for the admin console"),
            ));
        }
        if !tenants.insert(t.id.as_str()) {
            return Err(ConfigError::invalid(
                format!("{field}.id"),
                format!("tenant \"{}\" is defined twice", t.id),
            ));
        }
        if !servers.contains(t.server.as_str()) {
            return Err(ConfigError::invalid(
                format!("{field}.server"),
                format!("no server named \"{}\" in [[servers]]", t.server),
            ));
        }
        if let Some(replicas) = &t.replicas {
            check_replicas(&format!("{field}.replicas"), replicas, &t.server, &servers)?;
        }
        if t.database.is_empty() || t.database.len() > 63 || t.database.contains('\0') {
            return Err(ConfigError::invalid(
                format!("{field}.database"),
                "must be 1-63 bytes",
            ));
        }
        match (t.tier, &t.schema) {
            (Tier::Schema, None) => {
                return Err(ConfigError::invalid(
                    format!("{field}.schema"),
                    "is required for a schema-tier tenant",
                ))
            }
            (Tier::Schema, Some(schema)) if !is_schema_name(schema) => {
                return Err(ConfigError::invalid(
                    format!("{field}.schema"),
                    format!("\"{schema}\" is not a valid schema name (1-63 of a-z, 0-9, '_', starting with a letter or '_')"),
                ))
            }
            (Tier::Database | Tier::Row, Some(_)) => {
                return Err(ConfigError::invalid(
                    format!("{field}.schema"),
                    format!("only schema-tier tenants have a schema (this tenant is {}-tier)", t.tier.as_str()),
                ))
            }
            _ => {}
        }
        if t.tier == Tier::Row && config.row_key.is_none() && config.registry.is_none() {
            return Err(ConfigError::invalid(
                "row_key",
                format!("row-tier tenant \"{}\" needs a key to prove its context to the server: set row_key = \"file:PATH\" (make one with `pgtenant registry gen-key`)", t.id),
            ));
        }
        if t.pool_size == Some(0) {
            return Err(ConfigError::invalid(
                format!("{field}.pool_size"),
                "must be at least 1",
            ));
        }
        if t.weight == Some(0) {
            return Err(ConfigError::invalid(
                format!("{field}.weight"),
                "must be at least 1",
            ));
        }
        for name in t.params.keys() {
            if !is_setting_name(name) {
                return Err(ConfigError::invalid(
                    format!("{field}.params.{name}"),
                    "is not a valid setting name",
                ));
            }
            if is_tier_owned_setting(name, &config.row_tenant_setting) {
                return Err(ConfigError::invalid(
                    format!("{field}.params.{name}"),
                    "is set by pgtenant from the tenant's tier and cannot be overridden",
                ));
            }
        }
        for (name, cap) in &t.limits {
            crate::tenancy::limits::validate(name, cap)
                .map_err(|e| ConfigError::invalid(format!("{field}.limits.{name}"), e))?;
        }
        let mut users = HashSet::new();
        for (j, u) in t.users.iter().enumerate() {
            let field = format!("{field}.users[{j}]");
            if u.name.is_empty() || u.name.contains(sep.as_str()) || u.name.contains('\0') {
                return Err(ConfigError::invalid(
                    format!("{field}.name"),
                    format!("must be non-empty and must not contain the separator \"{sep}\""),
                ));
            }
            if !users.insert(u.name.as_str()) {
                return Err(ConfigError::invalid(
                    format!("{field}.name"),
                    format!("user \"{}\" is defined twice", u.name),
                ));
            }
            if ScramVerifier::parse(&u.scram).is_none() {
                return Err(ConfigError::invalid(
                    format!("{field}.scram"),
                    "is not a SCRAM-SHA-256 verifier (make one with `pgtenant hash-password`)",
                ));
            }
            if u.backend_user.is_empty() {
                return Err(ConfigError::invalid(
                    format!("{field}.backend_user"),
                    "must not be empty",
                ));
            }
            match (&u.backend_password, &u.backend_password_env) {
                (Some(_), Some(_)) => {
                    return Err(ConfigError::invalid(
                        format!("{field}.backend_password_env"),
                        "give either backend_password or backend_password_env, not both",
                    ))
                }
                (None, Some(var)) if std::env::var_os(var).is_none() => {
                    return Err(ConfigError::invalid(
                        format!("{field}.backend_password_env"),
                        format!("environment variable {var} is not set"),
                    ))
                }
                _ => {}
            }
        }
    }
    check_own_databases(config)
}

/// A database-tier tenant's database is its own: no other tenant, of any tier, may use the
/// same database on the same server. Its isolation rests on that: notification channels, for
/// one, are database-wide, and only this tier hears them (`TierRules::notifications`).
fn check_own_databases(config: &Config) -> Result<(), ConfigError> {
    let mut users: std::collections::BTreeMap<(&str, &str), Vec<(usize, &TenantConfig)>> =
        Default::default();
    for (i, t) in config.tenants.iter().enumerate() {
        users
            .entry((t.server.as_str(), t.database.as_str()))
            .or_default()
            .push((i, t));
    }
    for ((server, database), tenants) in users {
        let own = tenants.iter().find(|(_, t)| t.tier == Tier::Database);
        if let (Some((i, t)), true) = (own, tenants.len() > 1) {
            let other = tenants
                .iter()
                .find(|(_, o)| o.id != t.id)
                .map_or("", |(_, o)| o.id.as_str());
            return Err(ConfigError::invalid(
                format!("tenants[{i}].database"),
                format!("database-tier tenant \"{}\" shares database \"{database}\" on server \"{server}\" with tenant \"{other}\": a database-tier tenant has a database of its own (tenants that share one belong in the schema or row tier)", t.id),
            ));
        }
    }
    Ok(())
}

/// Replica names must be other servers of the config, each listed once.
fn check_replicas(
    field: &str,
    replicas: &[String],
    primary: &str,
    servers: &HashSet<&str>,
) -> Result<(), ConfigError> {
    let mut seen = HashSet::new();
    for r in replicas {
        if !servers.contains(r.as_str()) {
            return Err(ConfigError::invalid(
                field,
                format!("no server named \"{r}\" in [[servers]]"),
            ));
        }
        if r == primary {
            return Err(ConfigError::invalid(
                field,
                format!("server \"{r}\" cannot be a replica of itself"),
            ));
        }
        if !seen.insert(r.as_str()) {
            return Err(ConfigError::invalid(
                field,
                format!("replica \"{r}\" is listed twice"),
            ));
        }
    }
    Ok(())
}

pub fn is_tenant_id(s: &str) -> bool {
    let b = s.as_bytes();
    !b.is_empty()
        && b.len() <= 63
        && (b[0].is_ascii_lowercase() || b[0].is_ascii_digit())
        && b.iter()
            .all(|&c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'_' || c == b'-')
}

pub fn is_schema_name(s: &str) -> bool {
    let b = s.as_bytes();
    !b.is_empty()
        && b.len() <= 63
        && (b[0].is_ascii_lowercase() || b[0] == b'_')
        && b.iter()
            .all(|&c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'_')
}

pub fn is_setting_name(s: &str) -> bool {
    let b = s.as_bytes();
    !b.is_empty()
        && (b[0].is_ascii_alphabetic() || b[0] == b'_')
        && b.iter()
            .all(|&c| c.is_ascii_alphanumeric() || c == b'_' || c == b'.')
}

/// Settings the tier pins; a tenant's `params` must not fight them.
pub fn is_tier_owned_setting(name: &str, row_setting: &str) -> bool {
    name.eq_ignore_ascii_case("search_path")
        || name.eq_ignore_ascii_case(row_setting)
        || crate::tenancy::row_context::is_reserved_setting(name)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::PeerConfig;

    fn with_peers(peer_id: u16, ids: &[u16]) -> Config {
        let mut c = Config::empty();
        c.peer_id = peer_id;
        c.peers = ids
            .iter()
            .map(|&id| PeerConfig {
                id,
                host: "127.0.0.1".into(),
                port: 6432,
            })
            .collect();
        c
    }

    /// A config of tenants (id, tier, database) on one server.
    fn tenants(list: &[(&str, &str, &str)]) -> Result<Config, ConfigError> {
        let mut text =
            String::from("[[servers]]\nname = \"s\"\nhost = \"127.0.0.1\"\nport = 5432\n");
        for (id, tier, database) in list {
            text.push_str(&format!(
                "[[tenants]]\nid = \"{id}\"\ntier = \"{tier}\"\nserver = \"s\"\ndatabase = \"{database}\"\n"
            ));
            if *tier == "schema" {
                text.push_str(&format!("schema = \"{id}\"\n"));
            }
        }
        Config::parse(&text)
    }

    #[test]
    fn a_database_tier_tenant_may_not_share_its_database() {
        for other in ["database", "schema"] {
            let e = tenants(&[("a", "database", "shared"), ("b", other, "shared")]).unwrap_err();
            let e = e.to_string();
            assert!(
                e.contains("\"a\"") && e.contains("\"b\"") && e.contains("of its own"),
                "{e}"
            );
        }
    }

    #[test]
    fn schema_tenants_share_a_database_and_database_tenants_each_have_one() {
        let c = tenants(&[
            ("a", "database", "a"),
            ("b", "database", "b"),
            ("c", "schema", "shared"),
            ("d", "schema", "shared"),
        ]);
        assert!(c.is_ok(), "{c:?}");
    }

    #[test]
    fn peers_with_distinct_ids_are_accepted() {
        assert!(validate(&with_peers(1, &[2, 3])).is_ok());
    }

    #[test]
    fn a_peer_with_this_instances_id_or_a_repeated_one_is_refused() {
        assert!(validate(&with_peers(1, &[1])).is_err());
        assert!(validate(&with_peers(1, &[2, 2])).is_err());
    }

    #[test]
    fn peers_need_a_peer_id_and_ids_fit_the_cancel_key() {
        assert!(validate(&with_peers(0, &[2])).is_err());
        assert!(validate(&with_peers(2048, &[])).is_err());
        assert!(validate(&with_peers(1, &[2048])).is_err());
    }
}
