//! The scale benchmark's load: many tenants of very different sizes through one pooler.
//!
//! Opens every client connection at once (a SCRAM login storm, timed), then runs a mixed load
//! for `--seconds`:
//! - tenant 0, *noisy*: `--noisy-clients` clients (10x a tenant's), each in a closed loop of
//!   `SELECT pg_sleep(0.01)` transactions, so it wants ten times the connections of any other
//!   tenant (skipped with `--noisy-clients=0`: the baseline);
//! - tenants 1..=`--busy`, *busy*: their clients run a point select every `--busy-ms`;
//! - the rest, *quiet*: their clients run a point select every `--quiet-ms` (random phase).
//!
//! Meanwhile it samples, every 100 ms, the server's count of backends of `--backend-user`
//! (peak connections; pgtenant's health check, outside the budget, is not counted) and, with `--pid`, the pooler's RSS; CPU is the pooler's user+system time
//! over the run. The first `--warmup` seconds (default 5) are not measured, but their errors
//! count. Prints one markdown row per tenant class. Driven by `benches/scale.sh`, which
//! starts PostgreSQL (max_connections = 100), pgtenant and PgBouncer 1.25 and runs this against
//! each; see docs/benchmarks.md.
//!
//! Flags are `--name=value`: target (host:port), user and db (with `{t}` for the tenant
//! number), password, tenants, clients, noisy-clients, busy, busy-ms, quiet-ms, seconds,
//! direct (host:port:db:user of the server, for sampling), backend-user, pid, label.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio_postgres::{Client, NoTls};

struct Args(HashMap<String, String>);

impl Args {
    fn parse() -> Args {
        let mut m = HashMap::new();
        for a in std::env::args().skip(1) {
            if let Some((k, v)) = a.trim_start_matches("--").split_once('=') {
                m.insert(k.to_string(), v.to_string());
            }
        }
        Args(m)
    }

    fn str(&self, k: &str, default: &str) -> String {
        self.0
            .get(k)
            .cloned()
            .unwrap_or_else(|| default.to_string())
    }

    fn num(&self, k: &str, default: u64) -> u64 {
        self.0
            .get(k)
            .map(|v| v.parse().unwrap_or_else(|_| panic!("--{k} is a number")))
            .unwrap_or(default)
    }
}

#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
enum Class {
    Noisy,
    Busy,
    Quiet,
}

#[derive(Default)]
struct Record {
    latencies_us: Vec<u32>,
    errors: u64,
}

struct Shared {
    stop: AtomicBool,
    /// Latencies count from here on (after the warm-up).
    measure_from: Instant,
    records: Mutex<HashMap<Class, Record>>,
    first_errors: Mutex<Vec<String>>,
    transactions: AtomicU64,
}

impl Shared {
    fn note_error(&self, class: Class, e: &tokio_postgres::Error) {
        if let Ok(mut r) = self.records.lock() {
            r.entry(class).or_default().errors += 1;
        }
        if let Ok(mut f) = self.first_errors.lock() {
            if f.len() < 5 {
                let msg = e
                    .as_db_error()
                    .map(|d| format!("{}: {}", d.code().code(), d.message()))
                    .unwrap_or_else(|| e.to_string());
                f.push(format!("{class:?}: {msg}"));
            }
        }
    }
}

fn percentile(sorted: &[u32], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    f64::from(sorted[i]) / 1000.0
}

/// (RSS KiB, user+system clock ticks) of a process.
fn proc_stats(pid: u32) -> Option<(u64, u64)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let rss = status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()?;
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after = stat.rsplit_once(')')?.1;
    let f: Vec<&str> = after.split_whitespace().collect();
    let ticks = f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?;
    Some((rss, ticks))
}

async fn connect(conn: &str) -> Result<Client, tokio_postgres::Error> {
    let (client, connection) = tokio_postgres::connect(conn, NoTls).await?;
    tokio::spawn(connection);
    Ok(client)
}

async fn run_client(
    client: Client,
    class: Class,
    period: Duration,
    phase: Duration,
    shared: Arc<Shared>,
) {
    let (sql, period) = match class {
        Class::Noisy => ("SELECT pg_sleep(0.01)", Duration::ZERO),
        _ => (
            "SELECT abalance FROM pgbench_accounts WHERE aid = $1",
            period,
        ),
    };
    let stmt = match client.prepare(sql).await {
        Ok(s) => s,
        Err(e) => {
            shared.note_error(class, &e);
            return;
        }
    };
    tokio::time::sleep(phase).await;
    let mut lat = Vec::new();
    let mut next = Instant::now();
    let mut aid: i32 = 1 + (phase.as_micros() % 100_000) as i32;
    while !shared.stop.load(Ordering::Relaxed) {
        let t = Instant::now();
        let r = if class == Class::Noisy {
            client.query(&stmt, &[]).await
        } else {
            aid = aid % 100_000 + 1;
            client.query(&stmt, &[&aid]).await
        };
        match r {
            Ok(_) if t >= shared.measure_from => {
                lat.push(t.elapsed().as_micros().min(u128::from(u32::MAX)) as u32);
                shared.transactions.fetch_add(1, Ordering::Relaxed);
            }
            Ok(_) => {}
            Err(e) => {
                // Errors count during the warm-up too: none is acceptable.
                shared.note_error(class, &e);
                if client.is_closed() {
                    break;
                }
            }
        }
        if !period.is_zero() {
            next += period;
            let now = Instant::now();
            if next > now {
                tokio::time::sleep(next - now).await;
            } else {
                next = now;
            }
        }
    }
    if let Ok(mut r) = shared.records.lock() {
        r.entry(class).or_default().latencies_us.extend(lat);
    }
}

#[tokio::main]
async fn main() {
    let a = Args::parse();
    let target = a.str("target", "127.0.0.1:6432");
    let (host, port) = target.split_once(':').expect("--target=host:port");
    let user_fmt = a.str("user", "app.t{t}");
    let db_fmt = a.str("db", "t{t}");
    let password = a.str("password", "bench");
    let tenants = a.num("tenants", 1000) as usize;
    let clients = a.num("clients", 10) as usize;
    let noisy_clients = a.num("noisy-clients", 100) as usize;
    let busy = a.num("busy", 10) as usize;
    let busy_period = Duration::from_millis(a.num("busy-ms", 20));
    let quiet_period = Duration::from_millis(a.num("quiet-ms", 2000));
    let seconds = a.num("seconds", 30);
    let warmup = Duration::from_secs(a.num("warmup", 5));
    let label = a.str("label", &target);
    let pid = a.0.get("pid").and_then(|p| p.parse::<u32>().ok());
    let backend_user = a.str("backend-user", "scale");
    let direct = a.str("direct", "127.0.0.1:55432:bench:postgres");
    let d: Vec<&str> = direct.split(':').collect();
    let direct_conn = format!(
        "host={} port={} dbname={} user={} password=bench",
        d[0], d[1], d[2], d[3]
    );

    // Who connects: (tenant, class) per client.
    let mut plan = Vec::new();
    for t in 0..tenants {
        let (class, n) = match t {
            0 => (Class::Noisy, noisy_clients),
            t if t <= busy => (Class::Busy, clients),
            _ => (Class::Quiet, clients),
        };
        for _ in 0..n {
            plan.push((t, class));
        }
    }

    // The login storm: every connection at once.
    let started = Instant::now();
    let failed = Arc::new(AtomicUsize::new(0));
    let first_login_error = Arc::new(Mutex::new(None::<String>));
    let logins = plan.iter().map(|&(t, class)| {
        let conn = format!(
            "host={host} port={port} user={} dbname={} password={password} connect_timeout=120",
            user_fmt.replace("{t}", &format!("{t:04}")),
            db_fmt.replace("{t}", &format!("{t:04}")),
        );
        let failed = failed.clone();
        let first = first_login_error.clone();
        tokio::spawn(async move {
            match connect(&conn).await {
                Ok(c) => Some((c, class)),
                Err(e) => {
                    failed.fetch_add(1, Ordering::Relaxed);
                    if let Ok(mut f) = first.lock() {
                        f.get_or_insert_with(|| {
                            e.as_db_error()
                                .map(|d| format!("{}: {}", d.code().code(), d.message()))
                                .unwrap_or_else(|| e.to_string())
                        });
                    }
                    None
                }
            }
        })
    });
    let logins: Vec<_> = logins.collect();
    let mut connected = Vec::with_capacity(plan.len());
    for l in logins {
        if let Ok(Some(c)) = l.await {
            connected.push(c);
        }
    }
    let login_secs = started.elapsed().as_secs_f64();
    eprintln!(
        "{label}: {} of {} clients logged in in {login_secs:.1} s ({:.0} logins/s), {} failed{}",
        connected.len(),
        plan.len(),
        connected.len() as f64 / login_secs,
        failed.load(Ordering::Relaxed),
        first_login_error
            .lock()
            .ok()
            .and_then(|f| f.clone())
            .map(|e| format!(" (first: {e})"))
            .unwrap_or_default()
    );

    let shared = Arc::new(Shared {
        stop: AtomicBool::new(false),
        measure_from: Instant::now() + warmup,
        records: Mutex::default(),
        first_errors: Mutex::default(),
        transactions: AtomicU64::new(0),
    });
    let sampler_stop = Arc::new(AtomicBool::new(false));
    let sampler = {
        let stop = sampler_stop.clone();
        tokio::spawn(async move {
            let direct = connect(&direct_conn)
                .await
                .expect("direct connection to sample");
            let (mut peak, mut peak_rss) = (0i64, 0u64);
            while !stop.load(Ordering::Relaxed) {
                if let Ok(r) = direct
                    .query_one(
                        "SELECT count(*) FROM pg_stat_activity WHERE usename = $1 \
                         AND application_name <> 'pgtenant health check'",
                        &[&backend_user],
                    )
                    .await
                {
                    peak = peak.max(r.get::<_, i64>(0));
                }
                if let Some((rss, _)) = pid.and_then(proc_stats) {
                    peak_rss = peak_rss.max(rss);
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            (peak, peak_rss)
        })
    };
    let run_started = Instant::now() + warmup;
    let mut tasks = Vec::new();
    for (i, (client, class)) in connected.into_iter().enumerate() {
        let period = match class {
            Class::Busy => busy_period,
            _ => quiet_period,
        };
        // Spread the first requests over one period, deterministically.
        let phase = if period.is_zero() {
            Duration::ZERO
        } else {
            Duration::from_micros((i as u64 * 7919) % period.as_micros() as u64)
        };
        tasks.push(tokio::spawn(run_client(
            client,
            class,
            period,
            phase,
            shared.clone(),
        )));
    }
    tokio::time::sleep(warmup).await;
    let cpu_before = pid.and_then(proc_stats);
    tokio::time::sleep(Duration::from_secs(seconds)).await;
    shared.stop.store(true, Ordering::Relaxed);
    let elapsed = run_started.elapsed().as_secs_f64();
    let cpu_after = pid.and_then(proc_stats);
    for t in tasks {
        let _ = t.await;
    }
    sampler_stop.store(true, Ordering::Relaxed);
    let (peak, peak_rss) = sampler.await.unwrap_or((0, 0));
    let ticks = 100.0; // USER_HZ
    let cpu = match (cpu_before, cpu_after) {
        (Some(b), Some(a)) => format!("{:.0} %", (a.1 - b.1) as f64 / ticks / elapsed * 100.0),
        _ => "-".into(),
    };
    let rss = if peak_rss > 0 {
        format!("{:.0} MiB", peak_rss as f64 / 1024.0)
    } else {
        "-".into()
    };
    let records = shared
        .records
        .lock()
        .map(|mut r| std::mem::take(&mut *r))
        .unwrap_or_default();
    println!(
        "| target | class | clients | TPS | p50 ms | p99 ms | errors | peak server conns | proxy peak RSS | proxy CPU |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|");
    for class in [Class::Noisy, Class::Busy, Class::Quiet] {
        let Some(mut r) = records.get(&class).map(|r| Record {
            latencies_us: r.latencies_us.clone(),
            errors: r.errors,
        }) else {
            continue;
        };
        r.latencies_us.sort_unstable();
        let n = plan.iter().filter(|(_, c)| *c == class).count();
        println!(
            "| {label} | {class:?} | {n} | {:.0} | {:.2} | {:.2} | {} | {peak} | {rss} | {cpu} |",
            r.latencies_us.len() as f64 / elapsed,
            percentile(&r.latencies_us, 0.5),
            percentile(&r.latencies_us, 0.99),
            r.errors,
        );
    }
    let first_errors = shared
        .first_errors
        .lock()
        .map(|f| f.clone())
        .unwrap_or_default();
    for e in first_errors {
        eprintln!("{label}: error: {e}");
    }
}
