#!/usr/bin/env bash
# The scale benchmark: 1,000 tenants x 10 clients (10,000 client connections, plus a noisy
# tenant's 100) through one pooler onto PostgreSQL with max_connections = 100; pgtenant and
# PgBouncer 1.25 side by side, each with and without the noisy tenant. Run as root from the
# repository; it uses ../shared/bench (pg-up.sh) and a PgBouncer built by pgbouncer-build.sh.
#
#   benches/scale.sh                 # SECONDS_PER_RUN=30 TENANTS=1000 CLIENTS=10
#
# Env: PGBOUNCER (default /tmp/pgbouncer-1.25.2/pgbouncer; skipped when absent), PG_PORT=55452,
#      PGT_PORT=6452, PGB_PORT=6453, SECONDS_PER_RUN, TENANTS, CLIENTS, NOISY_CLIENTS=100,
#      BUSY=10, BUSY_MS=20, QUIET_MS=2000, OUT=/tmp/scale-bench.
# What each class does is in benches/scale.rs; results and discussion in docs/benchmarks.md.
set -euo pipefail
HERE=$(cd "$(dirname "$0")/.." && pwd)
BENCH=${BENCH_DIR:-$HERE/../shared/bench}
PG_PORT=${PG_PORT:-55452}
PGT_PORT=${PGT_PORT:-6452}
PGB_PORT=${PGB_PORT:-6453}
TENANTS=${TENANTS:-1000}
CLIENTS=${CLIENTS:-10}
NOISY_CLIENTS=${NOISY_CLIENTS:-100}
SECS=${SECONDS_PER_RUN:-30}
PGBOUNCER=${PGBOUNCER:-/tmp/pgbouncer-1.25.2/pgbouncer}
OUT=${OUT:-/tmp/scale-bench}
POOL_SIZE=20
# What pgtenant reads from the server: 100 - 3 superuser-reserved - 5 (pool.server_reserve).
BUDGET=92
mkdir -p "$OUT"
ulimit -n "$(ulimit -Hn)"

echo "== PostgreSQL on $PG_PORT, max_connections = 100"
MAX_CONN=100 "$BENCH/pg-up.sh" "$PG_PORT" >/dev/null
PGBIN=$(dirname "$(ls /usr/lib/postgresql/*/bin/psql | tail -1)")
psql() { "$PGBIN/psql" -X -q -h 127.0.0.1 -p "$PG_PORT" -U postgres "$@"; }
if ! psql -d bench -tAc "SELECT 1 FROM pgbench_accounts LIMIT 1" >/dev/null 2>&1; then
  "$PGBIN/pgbench" -i -s 1 -q -h 127.0.0.1 -p "$PG_PORT" -U postgres bench >/dev/null 2>&1
fi
psql -d bench -c "DO \$\$BEGIN IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'scale') THEN CREATE ROLE scale LOGIN; END IF; END\$\$; GRANT SELECT ON pgbench_accounts TO scale"

echo "== building"
(cd "$HERE" && cargo build --release -q && cargo build --release -q --bench scale)
PGT_BIN=$HERE/target/release/pgtenant
LOAD=$(ls -t "$HERE"/target/release/deps/scale-* | grep -v '\.d$' | head -1)

echo "== pgtenant config: $TENANTS tenants"
VERIFIER=$(printf bench | "$PGT_BIN" hash-password)
CONF=$OUT/pgtenant.toml
{
  cat <<TOML
listen = "127.0.0.1:$PGT_PORT"
max_pending_logins = 20000

[pool]
default_size = $POOL_SIZE
max_client_connections = 20000

[log]
level = "warn"

[[servers]]
name = "pg"
host = "127.0.0.1"
port = $PG_PORT
sslmode = "disable"
TOML
  for ((t = 0; t < TENANTS; t++)); do
    printf '\n[[tenants]]\nid = "t%04d"\ntier = "database"\nserver = "pg"\ndatabase = "bench"\n[[tenants.users]]\nname = "app"\nscram = "%s"\nbackend_user = "scale"\n' "$t" "$VERIFIER"
  done
} >"$CONF"

echo "== PgBouncer config: $TENANTS databases"
PGB_DIR=$OUT/pgbouncer
mkdir -p "$PGB_DIR"
{
  echo "[databases]"
  for ((t = 0; t < TENANTS; t++)); do
    printf 't%04d = host=127.0.0.1 port=%s dbname=bench user=scale\n' "$t" "$PG_PORT"
  done
  cat <<INI
[pgbouncer]
listen_addr = 127.0.0.1
listen_port = $PGB_PORT
listen_backlog = 4096
unix_socket_dir = $PGB_DIR
auth_type = scram-sha-256
auth_file = $PGB_DIR/userlist.txt
pool_mode = transaction
default_pool_size = $POOL_SIZE
max_user_connections = $BUDGET
max_client_conn = 20000
max_prepared_statements = 200
log_connections = 0
log_disconnections = 0
logfile = $PGB_DIR/pgbouncer.log
pidfile = $PGB_DIR/pgbouncer.pid
INI
} >"$PGB_DIR/pgbouncer.ini"
printf '"app" "bench"\n"scale" ""\n' >"$PGB_DIR/userlist.txt"
chown -R postgres: "$PGB_DIR"; chmod 600 "$PGB_DIR/userlist.txt"

stop_all() {
  [[ -n ${PGT_PID:-} ]] && kill "$PGT_PID" 2>/dev/null || true
  [[ -s $PGB_DIR/pgbouncer.pid ]] && kill "$(cat "$PGB_DIR/pgbouncer.pid")" 2>/dev/null || true
}
trap stop_all EXIT

run_load() { # label port user-format db-format pid noisy-clients
  "$LOAD" --label="$1" --target="127.0.0.1:$2" --user="$3" --db="$4" --pid="$5" \
    --noisy-clients="$6" --tenants="$TENANTS" --clients="$CLIENTS" --busy="${BUSY:-10}" \
    --busy-ms="${BUSY_MS:-20}" --quiet-ms="${QUIET_MS:-2000}" --seconds="$SECS" \
    --direct="127.0.0.1:$PG_PORT:bench:postgres" --backend-user=scale
}

start_pgtenant() {
  started=$(date +%s.%N)
  "$PGT_BIN" --config "$CONF" serve >"$OUT/pgtenant.log" 2>&1 &
  PGT_PID=$!
  for _ in $(seq 200); do ss -Hltn "sport = :$PGT_PORT" | grep -q . && break; sleep 0.05; done
  echo "pgtenant up with $TENANTS tenants in $(echo "$(date +%s.%N) - $started" | bc) s"
}

start_pgbouncer() {
  runuser -u postgres -- sh -c 'ulimit -n "$(ulimit -Hn)" && exec "$2" -d -q "$1"' sh "$PGB_DIR/pgbouncer.ini" "$PGBOUNCER"
  for _ in $(seq 100); do ss -Hltn "sport = :$PGB_PORT" | grep -q . && break; sleep 0.05; done
}

for noisy in "$NOISY_CLIENTS" 0; do
  what=$([[ $noisy == 0 ]] && echo "without the noisy tenant" || echo "with the noisy tenant")
  echo "== pgtenant, $what"
  start_pgtenant
  run_load "pgtenant" "$PGT_PORT" 'app.t{t}' 't{t}' "$PGT_PID" "$noisy" | tee -a "$OUT/results.md"
  kill "$PGT_PID"; wait "$PGT_PID" 2>/dev/null || true; PGT_PID=
  if [[ -x $PGBOUNCER ]]; then
    echo "== PgBouncer 1.25, $what"
    start_pgbouncer
    run_load "pgbouncer" "$PGB_PORT" app 't{t}' "$(cat "$PGB_DIR/pgbouncer.pid")" "$noisy" | tee -a "$OUT/results.md"
    kill "$(cat "$PGB_DIR/pgbouncer.pid")"; sleep 1
  else
    echo "(no PgBouncer at $PGBOUNCER: build it with ../shared/bench/pgbouncer-build.sh)"
  fi
done
echo "== results in $OUT/results.md"
