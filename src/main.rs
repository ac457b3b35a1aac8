//! The `pgtenant` command line.

use std::io::Read;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use pgtenant::cli;
use pgtenant::cluster::PgCluster;
use pgtenant::config::Config;
use pgtenant::credentials::hash_password;
use pgtenant::demo;
use pgtenant::proxy::Proxy;

/// mimalloc rather than glibc malloc: the per-transaction state of a client (boxed while it is
/// active, freed while it idles, so idle clients stay small) is larger than glibc's per-thread
/// cache serves quickly; mimalloc's thread-local free lists make that allocation cheap.
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(
    name = "pgtenant",
    version,
    about = "Multi-tenant PostgreSQL proxy and pooler"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
    /// Config file: before or after the subcommand, or from PGTENANT_CONFIG.
    #[arg(
        long,
        short,
        global = true,
        env = "PGTENANT_CONFIG",
        default_value = "proxy.toml"
    )]
    config: PathBuf,
}

#[derive(Subcommand)]
enum Command {
    /// Serve clients with the tenants of a config file.
    Serve,
    /// Start a throwaway PostgreSQL with sample tenants of every tier and serve them.
    Demo {
        #[arg(long, default_value = "127.0.0.1:6432")]
        listen: SocketAddr,
    },
    /// Print a SCRAM-SHA-256 verifier for the password read from standard input.
    HashPassword,
    /// Write a self-signed certificate and key (server.crt, server.key) for trying TLS out.
    SelfSignedCert {
        /// Directory to write them to.
        #[arg(long, default_value = ".")]
        dir: PathBuf,
        /// Host names or IP addresses the certificate is for (repeat for more).
        #[arg(long = "name", default_values_t = ["localhost".to_string(), "127.0.0.1".to_string()])]
        names: Vec<String>,
    },
    /// Validate a config file and report the first problem.
    CheckConfig,
    /// The registry database: create it, rotate its master key, show its state.
    Registry {
        #[command(subcommand)]
        cmd: cli::RegistryCmd,
    },
    /// PostgreSQL servers tenants are provisioned on.
    Server {
        #[command(subcommand)]
        cmd: cli::ServerCmd,
    },
    /// Tenant lifecycle: create, list, show, update, suspend, resume, delete, dump.
    Tenant {
        #[command(subcommand)]
        cmd: cli::TenantCmd,
    },
    /// Install the row tier's tenant-context check (schema pgtenant_rls, keyed by this config's
    /// row key) and RLS policies on the public tables with a tenant_id column, in the database
    /// at --url (connect as the tables' owner). `tenant create` and `migrate` do this
    /// themselves; this is for row-tier tenants kept in the config file.
    RowTierInstall {
        /// Connection string of the shared row-tier database (libpq key=value or URL).
        #[arg(long)]
        url: String,
    },
    /// Admin console users kept in the registry: add, remove, list.
    Admin {
        #[command(subcommand)]
        cmd: cli::AdminCmd,
    },
    /// Hourly usage per tenant (transactions, queries, server time, bytes, connection time),
    /// summed over every proxy that flushed to the registry.
    Usage {
        #[command(flatten)]
        args: cli::UsageArgs,
    },
    /// Apply pending per-tenant migrations to every tenant with auto_update.
    Migrate {
        #[command(flatten)]
        args: cli::MigrateArgs,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // Commands other than serve log at the default settings; serve applies its config's.
    if !matches!(cli.command, Command::Serve) {
        pgtenant::logging::init(&pgtenant::config::LogConfig::default());
    }
    let config = cli.config;
    match cli.command {
        Command::HashPassword => hash_password_cmd(),
        Command::SelfSignedCert { dir, names } => {
            match pgtenant::tls::write_self_signed(&dir, &names) {
                Ok((cert, key)) => {
                    println!("{}\n{}", cert.display(), key.display());
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("{e}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::CheckConfig => match Config::load(&config).and_then(|c| {
            // Certificates and keys are read as the proxy would read them.
            pgtenant::tls::check_files(&c)
                .map(|()| c)
                .map_err(|e| pgtenant::config::ConfigError::invalid("tls", e.to_string()))
        }) {
            Ok(c) => {
                println!(
                    "{}: ok ({} servers, {} tenants)",
                    config.display(),
                    c.servers.len(),
                    c.tenants.len()
                );
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("{}: {e}", config.display());
                ExitCode::from(2)
            }
        },
        Command::Serve => {
            let config_path = config.clone();
            let config = match Config::load(&config) {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("{}: {e}", config.display());
                    return ExitCode::from(2);
                }
            };
            let path = config_path;
            pgtenant::logging::init(&config.log);
            runtime(config.worker_threads).block_on(serve(config, path))
        }
        Command::Demo { listen } => demo_cmd(listen),
        Command::Registry { cmd } => cli::finish(runtime(0).block_on(cli::registry(cmd, &config))),
        Command::Server { cmd } => cli::finish(runtime(0).block_on(cli::server(cmd, &config))),
        Command::Tenant { cmd } => cli::finish(runtime(0).block_on(cli::tenant(cmd, &config))),
        Command::RowTierInstall { url } => {
            cli::finish(runtime(0).block_on(cli::row_tier_install(&url, &config)))
        }
        Command::Admin { cmd } => cli::finish(runtime(0).block_on(cli::admin_cmd(cmd, &config))),
        Command::Usage { args } => cli::finish(runtime(0).block_on(cli::usage_cmd(args, &config))),
        Command::Migrate { args } => {
            cli::finish(runtime(0).block_on(cli::migrate_cmd(args, &config)))
        }
    }
}

/// The async runtime for `threads` worker threads: 1 is a single-threaded runtime (like
/// PgBouncer's one event loop, and the fastest on small machines where the proxy shares cores
/// with PostgreSQL), 0 means one per core.
fn runtime(threads: usize) -> tokio::runtime::Runtime {
    let mut builder = if threads == 1 {
        tokio::runtime::Builder::new_current_thread()
    } else {
        let mut b = tokio::runtime::Builder::new_multi_thread();
        if threads > 1 {
            b.worker_threads(threads);
        }
        b
    };
    match builder.enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("cannot start the async runtime: {e}");
            std::process::exit(1);
        }
    }
}

fn hash_password_cmd() -> ExitCode {
    let mut input = String::new();
    if let Err(e) = std::io::stdin().read_to_string(&mut input) {
        eprintln!("cannot read the password from standard input: {e}");
        return ExitCode::FAILURE;
    }
    let password = input.strip_suffix('\n').unwrap_or(&input);
    let password = password.strip_suffix('\r').unwrap_or(password);
    if password.is_empty() {
        eprintln!("empty password: type one on standard input, e.g. `echo -n secret | pgtenant hash-password`");
        return ExitCode::FAILURE;
    }
    println!("{}", hash_password(password));
    ExitCode::SUCCESS
}

async fn serve(config: Config, path: PathBuf) -> ExitCode {
    let proxy = match Proxy::bind(config).await {
        Ok(p) => p,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::FAILURE;
        }
    };
    let _ = proxy.context().config_path.set(path.clone());
    let reloader = tokio::spawn(reload_on_sighup(proxy.context(), path));
    proxy.run(shutdown_signal()).await;
    reloader.abort();
    ExitCode::SUCCESS
}

/// SIGHUP re-reads the config file and applies what can change without a restart; a file
/// that does not parse or validate is reported and the running config kept.
async fn reload_on_sighup(ctx: std::sync::Arc<pgtenant::context::ProxyContext>, path: PathBuf) {
    let Ok(mut hup) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) else {
        return;
    };
    while hup.recv().await.is_some() {
        match Config::load(&path).map_err(pgtenant::context::ServeError::from) {
            Ok(config) => {
                if let Err(e) = ctx.reload(&config) {
                    tracing::error!(error = %e, "config reload failed; the running config is kept");
                }
            }
            Err(e) => {
                tracing::error!(file = %path.display(), error = %e, "config reload failed; the running config is kept")
            }
        }
    }
}

/// Resolves on Ctrl-C or SIGTERM.
async fn shutdown_signal() {
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term => {}
    }
}

fn demo_cmd(listen: SocketAddr) -> ExitCode {
    eprintln!("starting a throwaway PostgreSQL…");
    // Started on the main thread, which lives as long as the demo: the server is tied to it.
    let cluster = match PgCluster::start() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("cannot start PostgreSQL: {e}");
            return ExitCode::FAILURE;
        }
    };
    let rt = runtime(0);
    let code = rt.block_on(async {
        let mut config = match demo::provision_registry(&cluster, cluster.dir()).await {
            Ok(c) => c,
            Err(e) => {
                eprintln!("cannot provision the demo tenants: {e}");
                return ExitCode::FAILURE;
            }
        };
        config.listen = listen;
        // The admin console and the Prometheus endpoint (9187, PgBouncer exporter's usual
        // port, unless something holds it).
        config.admin.users.push(pgtenant::config::AdminUserConfig {
            name: "admin".into(),
            scram: hash_password(demo::DEMO_PASSWORD),
        });
        let metrics_port = if std::net::TcpListener::bind(("127.0.0.1", 9187)).is_ok() {
            9187
        } else {
            0
        };
        config.admin.metrics_listen = Some(SocketAddr::from(([127, 0, 0, 1], metrics_port)));
        config.tls = match demo::self_signed_tls(cluster.dir()) {
            Ok(t) => t,
            Err(e) => {
                eprintln!("{e}");
                return ExitCode::FAILURE;
            }
        };
        let config_path = cluster.dir().join("proxy.toml");
        if let Err(e) = pgtenant::secret::write_private(&config_path, &config.to_toml()) {
            eprintln!("cannot write {}: {e}", config_path.display());
            return ExitCode::FAILURE;
        }
        let proxy = match Proxy::bind(config.clone()).await {
            Ok(p) => p,
            Err(e) => {
                eprintln!("{e}");
                return ExitCode::FAILURE;
            }
        };
        let addr = proxy.local_addr();
        let _ = proxy.context().config_path.set(config_path.clone());
        println!();
        println!("pgtenant demo: serving on {addr}");
        println!("PostgreSQL: {}", cluster.conn_string("postgres"));
        println!("config: {}", config_path.display());
        println!();
        println!("{:<10} {:<9} connect with", "tenant", "tier");
        for t in demo::sample_tenants() {
            println!("{:<10} {:<9} {}", t.id, t.tier.as_str(), demo::psql_line(addr, t.id));
        }
        println!();
        println!(
            "admin console: PGSSLMODE=require PGPASSWORD={} psql -h {} -p {} -U admin pgtenant -c 'SHOW POOLS'",
            demo::DEMO_PASSWORD,
            addr.ip(),
            addr.port()
        );
        if let Some(m) = proxy.context().metrics_addr.get() {
            println!("metrics:       curl -s http://{m}/metrics | grep pgtenant_");
        }
        if let Some(cert) = &config.tls.cert {
            println!(
                "TLS:           a self-signed certificate ({}); plaintext is served too",
                cert.display()
            );
        }
        println!();
        println!("Try: SELECT current_database(), current_schemas(true); SELECT * FROM accounts; and, as a row tenant, SELECT pgtenant_rls.tenant();");
        println!(
            "Schema changes (an ORM's migrations, pgbench -i): user {}.<tenant> of a database or schema tenant, same password.",
            demo::DEMO_DDL_ROLE
        );
        println!(
            "Manage tenants while it runs: pgtenant tenant list --config {}",
            config_path.display()
        );
        println!("Press Ctrl-C to stop and remove everything.");
        let reloader = tokio::spawn(reload_on_sighup(proxy.context(), config_path.clone()));
        proxy.run(shutdown_signal()).await;
        reloader.abort();
        ExitCode::SUCCESS
    });
    drop(rt);
    drop(cluster);
    eprintln!("demo stopped; throwaway PostgreSQL removed");
    code
}
