#!/usr/bin/env bash
# 1,000 tenants in the registry database (issue 16): how long creating them takes, and then
# startup, admin SHOW commands, RELOAD, a hot reload of one tenant, a metrics scrape, logins
# spread over many tenants, and one tenant's TPS beside the 999 others.
#
# Usage: benches/registry-scale.sh PG_PORT
#   PG_PORT: a throwaway cluster with a trusting superuser "postgres" on 127.0.0.1, e.g. from
#   ../shared/bench/pg-up.sh 55432 (it holds the registry and the tenants). Builds nothing: run
#   `cargo build --release` first.
# Env: REUSE=1 (keep the tenants of the last run) TENANTS=1000 (of which DATABASE=10 database tier, SCHEMA=190 schema tier, the rest row)
#      JOBS=4 (tenant creates at once) PROXY_PORT=6460 METRICS_PORT=9460 OUT=/tmp/registry-scale
set -euo pipefail
PG_PORT=${1:?usage: $0 PG_PORT}
TENANTS=${TENANTS:-1000}
DATABASE=${DATABASE:-10}
SCHEMA=${SCHEMA:-190}
JOBS=${JOBS:-4}
PROXY_PORT=${PROXY_PORT:-6460}
METRICS_PORT=${METRICS_PORT:-9460}
OUT=${OUT:-/tmp/registry-scale}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
BIN=$ROOT/target/release/pgtenant
mkdir -p "$OUT"
cd "$OUT"
pg() { command psql -X -q -v ON_ERROR_STOP=1 -h 127.0.0.1 -p "$PG_PORT" -U postgres "$@"; }
now() { date +%s.%N; }
ms() { python3 -c "print(round(($2 - $1) * 1000))"; }
SCRAM='SCRAM-SHA-256$4096:q+Q7ddOpfN5CXhFHLU6aPA==$QGYBDJ5C8G4sdkAYaAqUlUDi3S8D1QojgVJfF7APmSc=:pHcRWx+TSzXJ3Y4TP8SnGBrPwDjzwL4i7c6Ha8IIS68='  # "bench"

if [[ ${REUSE:-0} == 1 ]]; then
  echo "== REUSE=1: the tenants of the last run"
else
  echo "== clean slate: registry database, tenant databases, schemas and roles of earlier runs"
  pg -d postgres -c "DROP DATABASE IF EXISTS regscale" >/dev/null
  for db in $(pg -d postgres -Atc "SELECT datname FROM pg_database WHERE datname LIKE 'rs\_%'"); do
    pg -d postgres -c "DROP DATABASE \"$db\"" >/dev/null
  done
  for role in $(pg -d postgres -Atc "SELECT rolname FROM pg_roles WHERE rolname LIKE 'rs\_%'"); do
    pg -d postgres -c "DROP ROLE \"$role\"" >/dev/null
  done
  pg -d postgres -c "CREATE DATABASE regscale" >/dev/null
  "$BIN" registry gen-key >master.key
  cat >proxy.toml <<EOF
listen = "127.0.0.1:$PROXY_PORT"
[pool]
max_client_connections = 20000
[admin]
metrics_listen = "127.0.0.1:$METRICS_PORT"
users = [{ name = "admin", scram = '$SCRAM' }]
[registry]
url = "host=127.0.0.1 port=$PG_PORT user=postgres dbname=regscale"
key = "file:$OUT/master.key"
schema_database = "rs_schemas"
row_database = "rs_rows"
EOF
  "$BIN" registry init -c proxy.toml >/dev/null
  "$BIN" server add main --host 127.0.0.1 --port "$PG_PORT" --admin-user postgres -c proxy.toml >/dev/null

  echo "== creating $TENANTS tenants ($DATABASE database, $SCHEMA schema, the rest row), $JOBS at a time"
  for i in $(seq 1 "$TENANTS"); do
    tier=row
    ((i <= DATABASE)) && tier=database
    ((i > DATABASE && i <= DATABASE + SCHEMA)) && tier=schema
    echo "rs_$i $tier"
  done >tenants.txt
  t0=$(now)
  xargs -P "$JOBS" -L 1 sh -c 'echo bench | "$0" tenant create "$1" --tier "$2" --server main --password-stdin -c proxy.toml >/dev/null' "$BIN" <tenants.txt
  t1=$(now)
  echo "created $TENANTS tenants in $(ms "$t0" "$t1") ms"
fi

echo "== startup: from spawn to the first tenant login"
t0=$(now)
"$BIN" serve -c proxy.toml >serve.log 2>&1 &
PROXY=$!
trap 'kill $PROXY 2>/dev/null || true' EXIT
export PGPASSWORD=bench PGCONNECT_TIMEOUT=5
until command psql -X -h 127.0.0.1 -p "$PROXY_PORT" -U "app.rs_$TENANTS" -d "rs_$TENANTS" -Atc 'select 1' >/dev/null 2>&1; do
  kill -0 $PROXY || { cat serve.log; exit 1; }
  sleep 0.02
done
t1=$(now)
echo "startup to first login: $(ms "$t0" "$t1") ms"

echo "== logins spread over 200 tenants, one at a time (each opens its pools)"
t0=$(now)
for i in $(seq 1 5 1000); do
  command psql -X -h 127.0.0.1 -p "$PROXY_PORT" -U "app.rs_$i" -d "rs_$i" -Atc 'select 1' >/dev/null
done
t1=$(now)
echo "200 logins (psql each) in $(ms "$t0" "$t1") ms"

admin() { command psql -X -h 127.0.0.1 -p "$PROXY_PORT" -U admin -d pgtenant -Atc "$1"; }
timed() { # label command...
  local best=999999 t0 t1 m
  for _ in 1 2 3; do
    t0=$(now); "${@:2}" >/dev/null; t1=$(now)
    m=$(ms "$t0" "$t1"); ((m < best)) && best=$m
  done
  echo "$1: best of 3 ${best} ms"
}
echo "== admin console and metrics (psql login included)"
timed "psql login + SELECT 1 to a tenant" command psql -X -h 127.0.0.1 -p "$PROXY_PORT" -U app.rs_500 -d rs_500 -Atc 'select 1'
timed "SHOW VERSION (baseline: psql and its login)" admin "SHOW VERSION"
echo "SHOW TENANTS rows: $(admin 'SHOW TENANTS' | wc -l)"
timed "SHOW TENANTS" admin "SHOW TENANTS"
timed "SHOW POOLS" admin "SHOW POOLS"
timed "SHOW STATS" admin "SHOW STATS"
timed "RELOAD" admin "RELOAD"
timed "metrics scrape" curl -sf "http://127.0.0.1:$METRICS_PORT/metrics"
echo "metrics lines: $(curl -sf "http://127.0.0.1:$METRICS_PORT/metrics" | wc -l)"

echo "== hot reload of one tenant: registry change to the proxy serving it"
t0=$(now)
"$BIN" tenant suspend rs_777 -c proxy.toml >/dev/null
until { command psql -X -h 127.0.0.1 -p "$PROXY_PORT" -U app.rs_777 -d rs_777 -Atc 'select 1' 2>&1 || true; } | grep -q suspended; do
  sleep 0.005
done
t1=$(now)
echo "suspend seen by the proxy after $(ms "$t0" "$t1") ms (CLI run included)"
"$BIN" tenant resume rs_777 -c proxy.toml >/dev/null

echo "== one tenant's TPS beside the other $((TENANTS - 1)), and alone on a proxy of its own (SELECT 1, 16 clients, 5 s, interleaved)"
printf 'SELECT 1;\n' >select1.sql
cat >alone.toml <<EOF
listen = "127.0.0.1:$((PROXY_PORT + 1))"
[[servers]]
name = "main"
host = "127.0.0.1"
port = $PG_PORT
[[tenants]]
id = "rs_1"
tier = "database"
server = "main"
database = "rs_1"
[[tenants.users]]
name = "app"
scram = '$SCRAM'
backend_user = "postgres"
EOF
"$BIN" serve -c alone.toml >alone.log 2>&1 &
ALONE=$!
trap 'kill $PROXY $ALONE 2>/dev/null || true' EXIT
sleep 0.5
for rep in 1 2 3; do
  for where in registry alone; do
    port=$PROXY_PORT
    [[ $where == alone ]] && port=$((PROXY_PORT + 1))
    tps=$(pgbench -n -M extended -f select1.sql -c 16 -j 2 -T 5 -h 127.0.0.1 -p "$port" -U app.rs_1 rs_1 2>&1 | grep -oP 'tps = \K[0-9.]+')
    echo "rep $rep, tenant rs_1, $where: $tps TPS"
  done
done
