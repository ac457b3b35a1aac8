//! The isolation tiers and what each one means, in one place: a reviewer checks isolation
//! against `Tier::rules` and the code that reads it.
//!
//! Pins travel in the backend's StartupMessage, so they are the session defaults from the first
//! byte: nothing can run before them, and RESET / DISCARD ALL return to them.

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Tier {
    Database,
    Schema,
    Row,
}

/// What a tier means for the sessions and objects of its tenants.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TierRules {
    /// The setting pinned on every backend session (a startup parameter), which a client may
    /// change only for the length of a transaction.
    pub pinned_setting: Option<&'static str>,
    /// Tenants share server connections, each bound in turn to one tenant's row context
    /// (`row_context`): a reset and a binding before every switch.
    pub shared_connections: bool,
    /// A tenant's client user may be given DDL rights in its own place; the row tier's tables
    /// are everyone's, and change only through `pgtenant migrate`.
    pub ddl: bool,
    /// Read replicas serve its reads (every tier: the row context writes nothing).
    pub replicas: bool,
    /// NotificationResponses reach the tenant's clients. PostgreSQL's notification channels
    /// are database-wide, and any client can LISTEN (also from dynamic SQL, where no parser
    /// sees it): a tenant that shares its database would hear the others' NOTIFYs. Only the
    /// database tier has a database of its own.
    pub notifications: bool,
}

impl Tier {
    /// The tier's rules.
    pub const fn rules(self) -> TierRules {
        match self {
            Tier::Database => TierRules {
                pinned_setting: None,
                shared_connections: false,
                ddl: true,
                replicas: true,
                notifications: true,
            },
            Tier::Schema => TierRules {
                pinned_setting: Some("search_path"),
                shared_connections: false,
                ddl: true,
                replicas: true,
                notifications: false,
            },
            // RESET ALL would clear a pinned row context, so it is not pinned but bound again
            // (see `frontend::transaction::clears_row_context`).
            Tier::Row => TierRules {
                pinned_setting: None,
                shared_connections: true,
                ddl: false,
                replicas: true,
                notifications: false,
            },
        }
    }

    pub fn parse(s: &str) -> Option<Tier> {
        match s {
            "database" => Some(Tier::Database),
            "schema" => Some(Tier::Schema),
            "row" => Some(Tier::Row),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Tier::Database => "database",
            Tier::Schema => "schema",
            Tier::Row => "row",
        }
    }
}

/// `search_path` of a schema-tier session: the tenant's schema, then `public`.
pub fn schema_search_path(schema: &str) -> String {
    format!("{}, public", quote_ident(schema))
}

/// Startup parameters for a backend connection of a tenant of `tier` (its `schema`, its own
/// session defaults `params`): the tier's pin, then the defaults.
pub fn backend_startup_params(
    tier: Tier,
    schema: Option<&str>,
    params: &[(String, String)],
) -> Vec<(String, String)> {
    let mut out = Vec::with_capacity(params.len() + 1);
    match tier {
        Tier::Database => {}
        Tier::Schema => {
            if let Some(schema) = schema {
                out.push(("search_path".to_string(), schema_search_path(schema)));
            }
        }
        // Row tenants share connections: their context is a binding the server checks
        // (`row_context`), set per connection, not a startup parameter.
        Tier::Row => {}
    }
    out.extend(params.iter().cloned());
    out
}

/// Quotes an SQL identifier.
pub fn quote_ident(s: &str) -> String {
    format!("\"{}\"", s.replace('"', "\"\""))
}

/// Quotes an SQL string literal (standard_conforming_strings is on in every supported server).
pub fn quote_literal(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_schema_tier_pins_a_setting() {
        assert_eq!(Tier::Schema.rules().pinned_setting, Some("search_path"));
        assert_eq!(Tier::Database.rules().pinned_setting, None);
        assert_eq!(Tier::Row.rules().pinned_setting, None);
    }

    #[test]
    fn only_the_row_tier_shares_connections_and_refuses_ddl() {
        for t in [Tier::Database, Tier::Schema, Tier::Row] {
            assert_eq!(t.rules().shared_connections, t == Tier::Row);
            assert_eq!(t.rules().ddl, t != Tier::Row);
        }
    }

    #[test]
    fn only_a_schema_tenant_starts_with_its_search_path_pinned_before_its_own_defaults() {
        let own = [("TimeZone".to_string(), "UTC".to_string())];
        assert_eq!(
            backend_startup_params(Tier::Schema, Some("s"), &own),
            [
                ("search_path".to_string(), "\"s\", public".to_string()),
                own[0].clone()
            ]
        );
        for tier in [Tier::Database, Tier::Row] {
            assert_eq!(backend_startup_params(tier, None, &own), own);
        }
    }

    #[test]
    fn search_path_quotes_the_schema() {
        assert_eq!(schema_search_path("acme"), "\"acme\", public");
    }

    #[test]
    fn quoting_doubles_embedded_quotes() {
        assert_eq!(quote_ident("a\"b"), "\"a\"\"b\"");
        assert_eq!(quote_literal("it's"), "'it''s'");
    }
}
