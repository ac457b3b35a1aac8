//! What each isolation tier pins on a backend session.
//!
//! The pins travel in the backend's StartupMessage, so they are the session defaults from the
//! first byte: nothing can run before them, and RESET / DISCARD ALL return to them.

use crate::config::Tier;

use super::model::Tenant;

/// `search_path` of a schema-tier session: the tenant's schema, then `public`.
pub fn schema_search_path(schema: &str) -> String {
    format!("{}, public", quote_ident(schema))
}

/// Startup parameters for a backend connection of `tenant`: the tier's pin, then the tenant's own
/// session defaults.
pub fn backend_startup_params(tenant: &Tenant) -> Vec<(String, String)> {
    let mut params = Vec::with_capacity(tenant.params.len() + 1);
    match tenant.tier {
        Tier::Database => {}
        Tier::Schema => {
            if let Some(schema) = &tenant.schema {
                params.push(("search_path".to_string(), schema_search_path(schema)));
            }
        }
        // Row tenants share connections: their context is a binding the server checks
        // (`row_context`), set per connection, not a startup parameter.
        Tier::Row => {}
    }
    params.extend(tenant.params.iter().cloned());
    params
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
    fn search_path_quotes_the_schema() {
        assert_eq!(schema_search_path("acme"), "\"acme\", public");
    }

    #[test]
    fn quoting_doubles_embedded_quotes() {
        assert_eq!(quote_ident("a\"b"), "\"a\"\"b\"");
        assert_eq!(quote_literal("it's"), "'it''s'");
    }
}
