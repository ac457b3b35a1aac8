//! Throwaway PostgreSQL clusters for tests, benchmarks and `pgtenant demo`: initdb into a
//! temporary directory, a free port on 127.0.0.1, started as the `postgres` user when running
//! as root (initdb refuses root), removed again on drop.

use std::fs;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::{Pid, User};

#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    #[error("PostgreSQL server binaries not found: put initdb on PATH, or install PostgreSQL (apt-get install postgresql)")]
    NoBinaries,
    #[error("running as root, but there is no \"postgres\" user to run the server as")]
    NoPostgresUser,
    #[error("{what}: {source}")]
    Io {
        what: String,
        source: std::io::Error,
    },
    #[error("{0} failed: {1}")]
    Command(String, String),
    #[error("server did not become ready within {0:?}; log: {1}")]
    NotReady(Duration, String),
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> ClusterError {
    let what = what.into();
    move |source| ClusterError::Io { what, source }
}

/// A running throwaway cluster. Superuser `postgres`, trusted on 127.0.0.1 and on the Unix socket
/// in the cluster's directory; every other role authenticates with its password (md5 or SCRAM,
/// as stored), except members of `pgtenant_trust`, which are trusted.
pub struct PgCluster {
    dir: Option<tempfile::TempDir>,
    bindir: PathBuf,
    port: u16,
    child: Option<Child>,
}

impl PgCluster {
    pub fn start() -> Result<PgCluster, ClusterError> {
        let bindir = find_bindir().ok_or(ClusterError::NoBinaries)?;
        let owner = server_owner()?;
        let dir = owned_tempdir(owner.as_ref())?;
        let data = dir.path().join("data");
        let mut initdb = Command::new(bindir.join("initdb"));
        // The server user may not be able to enter our working directory.
        initdb
            .current_dir(dir.path())
            .arg("-D")
            .arg(&data)
            .args([
                "-U",
                "postgres",
                "-A",
                "trust",
                "--no-sync",
                "-E",
                "UTF8",
                "--locale=C",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        as_owner(&mut initdb, owner.as_ref());
        let out = initdb.output().map_err(io("running initdb"))?;
        if !out.status.success() {
            return Err(ClusterError::Command(
                "initdb".into(),
                String::from_utf8_lossy(&out.stderr).into_owned(),
            ));
        }
        fs::write(data.join("pg_hba.conf"), HBA).map_err(io("writing pg_hba.conf"))?;
        PgCluster::first_launch(dir, bindir, owner.as_ref())
    }

    /// A hot standby of `primary`, streaming from it: a base backup (`pg_basebackup -R`)
    /// started on a port of its own.
    pub fn start_standby(primary: &PgCluster) -> Result<PgCluster, ClusterError> {
        let owner = server_owner()?;
        let dir = owned_tempdir(owner.as_ref())?;
        let mut backup = Command::new(primary.program("pg_basebackup"));
        backup
            .current_dir(dir.path())
            .arg("-D")
            .arg(dir.path().join("data"))
            .args(["-h", primary.host(), "-p", &primary.port().to_string()])
            // A fast checkpoint: the default spreads it over minutes.
            .args([
                "-U",
                "postgres",
                "-X",
                "stream",
                "-R",
                "--no-sync",
                "-c",
                "fast",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        as_owner(&mut backup, owner.as_ref());
        let out = backup.output().map_err(io("running pg_basebackup"))?;
        if !out.status.success() {
            return Err(ClusterError::Command(
                "pg_basebackup".into(),
                String::from_utf8_lossy(&out.stderr).into_owned(),
            ));
        }
        PgCluster::first_launch(dir, primary.bindir.clone(), owner.as_ref())
    }

    fn first_launch(
        dir: tempfile::TempDir,
        bindir: PathBuf,
        owner: Option<&User>,
    ) -> Result<PgCluster, ClusterError> {
        let mut cluster = PgCluster {
            dir: Some(dir),
            bindir,
            port: 0,
            child: None,
        };
        let mut last = None;
        for _ in 0..3 {
            match cluster.launch(owner, None) {
                Ok(()) => return Ok(cluster),
                Err(e) => last = Some(e),
            }
        }
        Err(last.unwrap_or(ClusterError::NoBinaries))
    }

    fn launch(&mut self, owner: Option<&User>, port: Option<u16>) -> Result<(), ClusterError> {
        let dir = self.dir().to_path_buf();
        let port = match port {
            Some(p) => p,
            None => free_port().map_err(io("finding a free port"))?,
        };
        let log = fs::File::create(dir.join("postgres.log")).map_err(io("creating the log"))?;
        if let Some(u) = owner {
            let _ = std::os::unix::fs::chown(
                dir.join("postgres.log"),
                Some(u.uid.as_raw()),
                Some(u.gid.as_raw()),
            );
        }
        let log_err = log.try_clone().map_err(io("opening the log"))?;
        let mut cmd = Command::new(self.bindir.join("postgres"));
        cmd.current_dir(&dir)
            .arg("-D")
            .arg(dir.join("data"))
            .arg("-p")
            .arg(port.to_string())
            .arg("-c")
            .arg("listen_addresses=127.0.0.1")
            .arg("-c")
            .arg(format!("unix_socket_directories={}", dir.display()))
            .args(["-c", "fsync=off", "-c", "synchronous_commit=off"])
            // Standbys report their replay promptly (lag checks) and keep up with the tests.
            .args(["-c", "wal_receiver_status_interval=1"])
            .args(["-c", "full_page_writes=off", "-c", "max_connections=300"])
            .args([
                "-c",
                "shared_buffers=32MB",
                "-c",
                "log_min_messages=warning",
            ])
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log_err);
        as_owner(&mut cmd, owner);
        // If this process dies without dropping the cluster, take the server with it.
        // SAFETY: prctl is async-signal-safe, as pre_exec requires.
        unsafe {
            cmd.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGQUIT);
                Ok(())
            });
        }
        let child = cmd.spawn().map_err(io("starting postgres"))?;
        self.child = Some(child);
        self.port = port;
        let deadline = Instant::now() + Duration::from_secs(60);
        let pidfile = dir.join("data").join("postmaster.pid");
        loop {
            if let Some(child) = self.child.as_mut() {
                if let Ok(Some(_)) = child.try_wait() {
                    self.child = None;
                    return Err(ClusterError::NotReady(Duration::ZERO, self.log_tail()));
                }
            }
            if let Ok(text) = fs::read_to_string(&pidfile) {
                // A standby reports "standby" once it accepts read-only connections.
                if matches!(
                    text.lines().nth(7).map(str::trim),
                    Some("ready" | "standby")
                ) {
                    return Ok(());
                }
            }
            if Instant::now() > deadline {
                let tail = self.log_tail();
                self.shutdown();
                return Err(ClusterError::NotReady(Duration::from_secs(60), tail));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn host(&self) -> &'static str {
        "127.0.0.1"
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn dir(&self) -> &Path {
        self.dir
            .as_ref()
            .map(|d| d.path())
            .unwrap_or(Path::new("/nonexistent"))
    }

    pub fn bindir(&self) -> &Path {
        &self.bindir
    }

    /// libpq connection string for the superuser.
    pub fn conn_string(&self, database: &str) -> String {
        format!(
            "host=127.0.0.1 port={} user=postgres dbname={database}",
            self.port
        )
    }

    /// A superuser connection; its driver task runs on the current runtime.
    pub async fn connect(
        &self,
        database: &str,
    ) -> Result<tokio_postgres::Client, tokio_postgres::Error> {
        let (client, conn) =
            tokio_postgres::connect(&self.conn_string(database), tokio_postgres::NoTls).await?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        Ok(client)
    }

    /// Path of a client program (psql, pgbench, pg_dump) matching the server.
    pub fn program(&self, name: &str) -> PathBuf {
        let p = self.bindir.join(name);
        if p.exists() {
            p
        } else {
            PathBuf::from(name)
        }
    }

    fn log_tail(&self) -> String {
        let text = fs::read_to_string(self.dir().join("postgres.log")).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(10)..].join("\n")
    }

    /// Stops the server (fast shutdown, then kill after 10 s).
    pub fn shutdown(&mut self) {
        if let Some(mut child) = self.child.take() {
            let pid = Pid::from_raw(child.id() as i32);
            let _ = kill(pid, Signal::SIGINT);
            let deadline = Instant::now() + Duration::from_secs(10);
            loop {
                match child.try_wait() {
                    Ok(Some(_)) | Err(_) => break,
                    Ok(None) if Instant::now() > deadline => {
                        let _ = child.kill();
                        let _ = child.wait();
                        break;
                    }
                    Ok(None) => std::thread::sleep(Duration::from_millis(20)),
                }
            }
        }
    }

    /// Turns TLS on with this certificate chain and key (PEM) and restarts the server.
    pub fn enable_tls(&mut self, cert_pem: &str, key_pem: &str) -> Result<(), ClusterError> {
        use std::os::unix::fs::PermissionsExt;
        let owner = server_owner()?;
        let data = self.dir().join("data");
        for (name, text) in [("server.crt", cert_pem), ("server.key", key_pem)] {
            let path = data.join(name);
            fs::write(&path, text).map_err(io("writing the TLS files"))?;
            fs::set_permissions(&path, fs::Permissions::from_mode(0o600))
                .map_err(io("protecting the TLS key"))?;
            if let Some(u) = &owner {
                let _ = std::os::unix::fs::chown(&path, Some(u.uid.as_raw()), Some(u.gid.as_raw()));
            }
        }
        let mut conf = fs::OpenOptions::new()
            .append(true)
            .open(data.join("postgresql.conf"))
            .map_err(io("opening postgresql.conf"))?;
        std::io::Write::write_all(&mut conf, b"\nssl = on\n")
            .map_err(io("writing postgresql.conf"))?;
        self.restart()
    }

    /// Starts the server again on the same port, with the same data.
    pub fn restart(&mut self) -> Result<(), ClusterError> {
        self.shutdown();
        self.start_again()
    }

    /// Starts a server stopped with `shutdown` again, on the same port, with the same data.
    pub fn start_again(&mut self) -> Result<(), ClusterError> {
        let owner = server_owner()?;
        let port = self.port;
        self.launch(owner.as_ref(), Some(port))
    }

    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }
}

impl Drop for PgCluster {
    fn drop(&mut self) {
        self.shutdown();
        if let Some(dir) = self.dir.take() {
            let _ = dir.close();
        }
    }
}

/// A temporary directory the server's user owns.
fn owned_tempdir(owner: Option<&User>) -> Result<tempfile::TempDir, ClusterError> {
    let dir = tempfile::Builder::new()
        .prefix("pgtenant-pg-")
        .tempdir()
        .map_err(io("creating a temporary directory"))?;
    if let Some(u) = owner {
        std::os::unix::fs::chown(dir.path(), Some(u.uid.as_raw()), Some(u.gid.as_raw()))
            .map_err(io("chown of the temporary directory"))?;
    }
    Ok(dir)
}

/// The user the server runs as: `postgres` when we are root, else ourselves (None).
fn server_owner() -> Result<Option<User>, ClusterError> {
    if !nix::unistd::geteuid().is_root() {
        return Ok(None);
    }
    User::from_name("postgres")
        .ok()
        .flatten()
        .map(Some)
        .ok_or(ClusterError::NoPostgresUser)
}

fn as_owner(cmd: &mut Command, owner: Option<&User>) {
    if let Some(u) = owner {
        cmd.uid(u.uid.as_raw()).gid(u.gid.as_raw());
        cmd.env("HOME", &u.dir).env("USER", "postgres");
    }
}

const HBA: &str = "\
local all postgres trust
local all +pgtenant_trust trust
local all all md5
host all postgres 127.0.0.1/32 trust
host all +pgtenant_trust 127.0.0.1/32 trust
host all all 127.0.0.1/32 md5
local replication postgres trust
host replication postgres 127.0.0.1/32 trust
";

fn free_port() -> std::io::Result<u16> {
    let l = std::net::TcpListener::bind("127.0.0.1:0")?;
    Ok(l.local_addr()?.port())
}

/// Finds a directory with both initdb and postgres: PATH, `pg_config --bindir`, then the newest
/// `/usr/lib/postgresql/*/bin`.
pub fn find_bindir() -> Option<PathBuf> {
    let complete = |d: &Path| d.join("initdb").exists() && d.join("postgres").exists();
    if let Some(path) = std::env::var_os("PATH") {
        for d in std::env::split_paths(&path) {
            if d.join("initdb").exists() {
                let real = fs::canonicalize(d.join("initdb")).ok();
                if let Some(parent) = real.as_deref().and_then(Path::parent) {
                    if complete(parent) {
                        return Some(parent.to_path_buf());
                    }
                }
                if complete(&d) {
                    return Some(d);
                }
            }
        }
    }
    if let Ok(out) = Command::new("pg_config").arg("--bindir").output() {
        let d = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
        if complete(&d) {
            return Some(d);
        }
    }
    let mut versions: Vec<(u32, PathBuf)> = fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let v = e.file_name().to_str()?.parse().ok()?;
            Some((v, e.path().join("bin")))
        })
        .filter(|(_, d)| complete(d))
        .collect();
    versions.sort();
    versions.pop().map(|(_, d)| d)
}
