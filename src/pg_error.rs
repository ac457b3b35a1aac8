//! Errors of pgtenant's own PostgreSQL clients (registry, provisioning), in the server's words.

/// tokio-postgres prints only "db error"; the server's own words are in the DbError.
pub fn describe_pg_error(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => format!("{} ({})", db.message(), db.code().code()),
        None => match std::error::Error::source(e) {
            Some(src) => format!("{e}: {src}"),
            None => e.to_string(),
        },
    }
}
