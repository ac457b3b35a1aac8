#!/usr/bin/env bash
# User-space instructions a pooler spends per transaction, counted by callgrind: repeatable for
# the same binary and load whatever else the machine does, unlike CPU time. pgtenant (release
# build) and PgBouncer 1.25, each under valgrind in turn, in front of a throwaway PostgreSQL
# from ../shared/bench/pg-up.sh (plaintext, trust). Per transaction = the difference between a
# run of TX_HIGH and one of TX_LOW transactions per client, so startup and logins cancel out.
# Run as root from the repository.
#
#   benches/instructions.sh                      # select-only, extended, prepared; 1 client
#
# Env: CLIENTS=1 (exact; with more, how many events one epoll_wait returns depends on timing and
#      the count moves by about 1 %), JOBS=1 (pgbench threads; CLIENTS=16 JOBS=2 is the load
#      compare.sh and cpu-per-tx.sh use), TX_LOW=1000, TX_HIGH=5000, MODES (pgbench flags, `;`-separated,
#      default "-S;-S -M extended;-S -M prepared"), PGTENANT (default target/release/pgtenant),
#      PGBOUNCER (default /tmp/pgbouncer-1.25.2/pgbouncer; skipped when absent), PG_PORT=55462,
#      PGT_PORT=6462, PGB_PORT=6463, OUT=/tmp/instructions-bench.
set -euo pipefail
HERE=$(cd "$(dirname "$0")/.." && pwd)
BENCH=${BENCH_DIR:-$HERE/../shared/bench}
PG_PORT=${PG_PORT:-55462}
PGT_PORT=${PGT_PORT:-6462}
PGB_PORT=${PGB_PORT:-6463}
CLIENTS=${CLIENTS:-1}
TX_LOW=${TX_LOW:-1000}
TX_HIGH=${TX_HIGH:-5000}
MODES=${MODES:--S;-S -M extended;-S -M prepared}
PGTENANT=${PGTENANT:-$HERE/target/release/pgtenant}
PGBOUNCER=${PGBOUNCER:-/tmp/pgbouncer-1.25.2/pgbouncer}
OUT=${OUT:-/tmp/instructions-bench}
PGBIN=${PGBIN:-/usr/lib/postgresql/15/bin}
command -v valgrind >/dev/null || { echo "valgrind is needed" >&2; exit 1; }
[[ -x $PGTENANT ]] || { echo "build first: cargo build --release" >&2; exit 1; }

rm -rf "$OUT"; mkdir -p "$OUT"; chmod 777 "$OUT"
SYNC_COMMIT=off "$BENCH/pg-up.sh" "$PG_PORT" >/dev/null
trap '"$BENCH/pg-down.sh" "$PG_PORT" >/dev/null' EXIT
export PGPASSWORD=bench
"$PGBIN/pgbench" -i -q -s 1 -h 127.0.0.1 -p "$PG_PORT" -U postgres bench >/dev/null 2>&1

VERIFIER=$(printf bench | "$PGTENANT" hash-password)
cat >"$OUT/pgtenant.toml" <<CONF
listen = "127.0.0.1:$PGT_PORT"
[log]
level = "warn"
[[servers]]
name = "bench"
host = "127.0.0.1"
port = $PG_PORT
[[tenants]]
id = "bench"
tier = "database"
server = "bench"
database = "bench"
[[tenants.users]]
name = "app"
scram = "$VERIFIER"
backend_user = "postgres"
CONF
cat >"$OUT/pgbouncer.ini" <<CONF
[databases]
* = host=127.0.0.1 port=$PG_PORT
[pgbouncer]
listen_addr = 127.0.0.1
listen_port = $PGB_PORT
unix_socket_dir =
auth_type = trust
auth_file = $OUT/userlist.txt
pool_mode = transaction
default_pool_size = 20
max_prepared_statements = 200
ignore_startup_parameters = extra_float_digits
logfile = $OUT/pgbouncer.log
CONF
echo '"postgres" "bench"' >"$OUT/userlist.txt"
chown postgres: "$OUT"/pgbouncer.ini "$OUT"/userlist.txt

wait_port() { for _ in $(seq 1 200); do ss -Hltn "sport = :$1" | grep -q . && return 0; sleep 0.2; done; return 1; }

# Instructions of one run: pooler started under callgrind, pgbench against it, pooler stopped.
count() { # name tx mode
  local name=$1 tx=$2 mode=$3 port user
  rm -f "$OUT"/cg.*
  if [[ $name == pgtenant ]]; then
    port=$PGT_PORT user=app.bench
    (cd "$OUT" && valgrind --tool=callgrind --callgrind-out-file="$OUT/cg.%p" \
      "$PGTENANT" --config "$OUT/pgtenant.toml" serve >"$OUT/pooler.log" 2>&1) &
  else
    port=$PGB_PORT user=postgres
    (cd "$OUT" && runuser -u postgres -- valgrind --tool=callgrind --callgrind-out-file="$OUT/cg.%p" \
      "$PGBOUNCER" "$OUT/pgbouncer.ini" >"$OUT/pooler.log" 2>&1) &
  fi
  wait_port "$port" || { echo "$name did not start: $OUT/pooler.log" >&2; exit 1; }
  # shellcheck disable=SC2086 # the mode is pgbench flags
  "$PGBIN/pgbench" -n $mode -c "$CLIENTS" -j ${JOBS:-1} -t "$tx" -h 127.0.0.1 -p "$port" -U "$user" bench \
    >"$OUT/pgbench.log" 2>&1 || { cat "$OUT/pgbench.log" >&2; exit 1; }
  pkill -INT -f "valgrind.*($PGTENANT|$PGBOUNCER)" || true
  for _ in $(seq 1 100); do pgrep -f "valgrind.*($PGTENANT|$PGBOUNCER)" >/dev/null || break; sleep 0.2; done
  grep -h '^summary:\|^totals:' "$OUT"/cg.* | head -1 | awk '{print $2}'
}

printf '| mode | target | instructions per transaction |\n|---|---|---|\n'
IFS=';' read -ra modes <<<"$MODES"
for mode in "${modes[@]}"; do
  targets=(pgtenant)
  [[ -x $PGBOUNCER ]] && targets+=(pgbouncer)
  for t in "${targets[@]}"; do
    low=$(count "$t" "$TX_LOW" "$mode")
    high=$(count "$t" "$TX_HIGH" "$mode")
    printf '| %s | %s | %d |\n' "$mode" "$t" $(((high - low) / (CLIENTS * (TX_HIGH - TX_LOW))))
  done
done
