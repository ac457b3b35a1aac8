//! The registry database, its encryption, hot reload, tenant lifecycle, migrations and dumps,
//! against a real PostgreSQL.

mod support;

mod admin;
mod budget;
mod ddl;
mod encryption;
mod lifecycle;
mod migrations;
mod naming;
mod reload;
mod replicas;
mod session_features;
mod tls;
mod usage;
