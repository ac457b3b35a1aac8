#!/usr/bin/env bash
# What each isolation tier costs through pgtenant (issue 7): select-only TPS of one busy tenant
# of the database, schema and row tiers on the same server, and of 100 row tenants sharing one
# pool with uniformly mixed traffic, against one row tenant with the same number of clients.
#
# Usage: benches/isolation-cost.sh PG_PORT
#   PG_PORT: a throwaway cluster with a trusting superuser "postgres" on 127.0.0.1, e.g. from
#   ../shared/bench/pg-up.sh 55432. Builds nothing: run `cargo build --release` first.
# Env: T=5 (seconds a run) REPS=3 CLIENTS=16 MIXED=100 (clients, one per row tenant)
#      POOL=20 (server connections of the row group) PROXY_PORT=6450 OUT=/tmp/isolation-cost
set -euo pipefail
PG_PORT=${1:?usage: $0 PG_PORT}
T=${T:-5}
REPS=${REPS:-3}
CLIENTS=${CLIENTS:-16}
MIXED=${MIXED:-100}
POOL=${POOL:-20}
PROXY_PORT=${PROXY_PORT:-6450}
OUT=${OUT:-/tmp/isolation-cost}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
BIN=$ROOT/target/release/pgtenant
mkdir -p "$OUT"
psql() { command psql -X -q -v ON_ERROR_STOP=1 -h 127.0.0.1 -p "$PG_PORT" -U postgres "$@"; }

echo "== data: 100,000 rows per tier"
psql -d postgres <<'SQL'
DROP DATABASE IF EXISTS tier_db;
DROP DATABASE IF EXISTS tier_shared;
DROP DATABASE IF EXISTS tier_row;
DO $$ BEGIN
  IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'tier_db_app') THEN CREATE ROLE tier_db_app LOGIN; END IF;
  IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'tier_sch_app') THEN CREATE ROLE tier_sch_app LOGIN; END IF;
  IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'tier_row_app') THEN CREATE ROLE tier_row_app LOGIN; END IF;
END $$;
CREATE DATABASE tier_db;
CREATE DATABASE tier_shared;
CREATE DATABASE tier_row;
SQL
psql -d tier_db <<'SQL'
CREATE TABLE t (id int PRIMARY KEY, balance int NOT NULL);
INSERT INTO t SELECT g, 0 FROM generate_series(1, 100000) g;
GRANT SELECT, UPDATE ON t TO tier_db_app;
VACUUM ANALYZE t;
SQL
psql -d tier_shared <<'SQL'
CREATE SCHEMA sch;
CREATE TABLE sch.t (id int PRIMARY KEY, balance int NOT NULL);
INSERT INTO sch.t SELECT g, 0 FROM generate_series(1, 100000) g;
GRANT USAGE ON SCHEMA sch TO tier_sch_app;
GRANT SELECT, UPDATE ON sch.t TO tier_sch_app;
VACUUM ANALYZE sch.t;
SQL
# Row tenant rK owns the ids congruent to K modulo 100.
psql -d tier_row <<'SQL'
REVOKE TEMP ON DATABASE tier_row FROM PUBLIC;
CREATE TABLE t (id int PRIMARY KEY, tenant_id text NOT NULL, balance int NOT NULL);
INSERT INTO t SELECT g, 'r' || (g % 100 + 1), 0 FROM generate_series(1, 100000) g;
CREATE INDEX ON t (tenant_id, id);
GRANT SELECT, UPDATE ON t TO tier_row_app;
VACUUM ANALYZE t;
SQL

echo "== pgtenant config: tenants dbt (database), sch (schema), r1..r100 (row)"
SCRAM='SCRAM-SHA-256$4096:q+Q7ddOpfN5CXhFHLU6aPA==$QGYBDJ5C8G4sdkAYaAqUlUDi3S8D1QojgVJfF7APmSc=:pHcRWx+TSzXJ3Y4TP8SnGBrPwDjzwL4i7c6Ha8IIS68='  # "bench"
"$BIN" registry gen-key >"$OUT/row.key"
{
  echo "listen = \"127.0.0.1:$PROXY_PORT\""
  echo "row_key = \"file:$OUT/row.key\""
  printf '[pool]\ndefault_size = %s\nmax_client_connections = 20000\n' "$POOL"
  printf '[[servers]]\nname = "bench"\nhost = "127.0.0.1"\nport = %s\n' "$PG_PORT"
  tenant() { # id tier database backend_user [schema]
    printf '[[tenants]]\nid = "%s"\ntier = "%s"\nserver = "bench"\ndatabase = "%s"\npool_size = %s\n' "$1" "$2" "$3" "$POOL"
    [[ -n ${5:-} ]] && printf 'schema = "%s"\n' "$5"
    printf '[[tenants.users]]\nname = "app"\nscram = "%s"\nbackend_user = "%s"\n' "$SCRAM" "$4"
  }
  tenant dbt database tier_db tier_db_app
  tenant sch schema tier_shared tier_sch_app sch
  for k in $(seq 1 100); do tenant "r$k" row tier_row tier_row_app; done
} >"$OUT/proxy.toml"
"$BIN" row-tier-install --url "host=127.0.0.1 port=$PG_PORT user=postgres dbname=tier_row" -c "$OUT/proxy.toml"

"$BIN" serve -c "$OUT/proxy.toml" >"$OUT/serve.log" 2>&1 &
PROXY=$!
trap 'kill $PROXY 2>/dev/null || true' EXIT
for _ in $(seq 50); do
  command psql -X -h 127.0.0.1 -p "$PROXY_PORT" -U app -d dbt -c 'select 1' >/dev/null 2>&1 && break
  sleep 0.2
done
export PGPASSWORD=bench

# A point select of one of tenant rK's rows (every row exists in the other tiers' tables).
script() { # k
  printf '\\set id random(1, 999) * 100 + %s\nSELECT balance FROM t WHERE id = :id;\n' "$(($1 - 1))" >"$OUT/r$1.sql"
  echo "$OUT/r$1.sql"
}
tps() { grep -oP 'tps = \K[0-9.]+' | head -1; }
one() { # mode tenant k clients
  pgbench -n -M "$1" -f "$(script "$3")" -c "$4" -j 2 -T "$T" -h 127.0.0.1 -p "$PROXY_PORT" -U app "$2" 2>&1 | tps
}
# $MIXED pgbench processes with one client each; tenant of process i: r(i) or r1 for all.
many() { # mode same|mixed
  local pids=() files=()
  for i in $(seq 1 "$MIXED"); do
    local k=$i
    [[ $2 == same ]] && k=1
    files+=("$OUT/many.$i")
    pgbench -n -M "$1" -f "$(script "$k")" -c 1 -j 1 -T "$T" -h 127.0.0.1 -p "$PROXY_PORT" -U app "r$k" >"$OUT/many.$i" 2>&1 &
    pids+=($!)
  done
  wait "${pids[@]}"
  cat "${files[@]}" | grep -oP 'tps = \K[0-9.]+' | awk '{ s += $1 } END { printf "%.0f", s }'
}

echo "== runs: ${T}s each, $REPS repetitions, interleaved"
printf 'rep\tmode\tdatabase\tschema\trow\trow_same_x%s\trow_mixed_x%s\n' "$MIXED" "$MIXED" | tee "$OUT/results.tsv"
for rep in $(seq 1 "$REPS"); do
  for mode in simple prepared; do
    d=$(one "$mode" dbt 7 "$CLIENTS")
    s=$(one "$mode" sch 7 "$CLIENTS")
    r=$(one "$mode" r7 7 "$CLIENTS")
    same=$(many "$mode" same)
    mixed=$(many "$mode" mixed)
    printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$rep" "$mode" "$d" "$s" "$r" "$same" "$mixed" | tee -a "$OUT/results.tsv"
  done
done
python3 - "$OUT/results.tsv" <<'PY'
import statistics, sys
rows = [l.rstrip("\n").split("\t") for l in open(sys.argv[1])][1:]
for mode in ("simple", "prepared"):
    cols = list(zip(*[[float(x) for x in r[2:]] for r in rows if r[1] == mode]))
    d, s, r, same, mixed = (statistics.median(c) for c in cols)
    print(f"{mode:9} median TPS: database {d:.0f}  schema {s:.0f} ({s/d:.2f} of database)  "
          f"row {r:.0f} ({r/s:.2f} of schema)  one row tenant, many clients {same:.0f}  "
          f"100 row tenants mixed {mixed:.0f} ({mixed/same:.2f} of one tenant)")
PY
