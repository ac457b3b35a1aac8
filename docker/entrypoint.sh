#!/usr/bin/env bash
# Prepares the registry in the compose file's PostgreSQL (key, schema, server, sample tenants of
# every tier), once, then runs the given command. Every step may run again after a restart.
set -euo pipefail
CONFIG=/etc/pgtenant/proxy.toml
KEY=/var/lib/pgtenant/master.key
if [[ ! -s $KEY ]]; then
  umask 077
  pgtenant registry gen-key > "$KEY"
fi
# Client TLS: the certificate mounted at /etc/pgtenant/certs (server.crt, server.key), else a
# self-signed one made once, for trying it out.
TLS=/var/lib/pgtenant/tls
mkdir -p "$TLS"
if [[ -s /etc/pgtenant/certs/server.crt && -s /etc/pgtenant/certs/server.key ]]; then
  install -m 0644 /etc/pgtenant/certs/server.crt "$TLS/server.crt"
  install -m 0600 /etc/pgtenant/certs/server.key "$TLS/server.key"
elif [[ ! -s $TLS/server.crt ]]; then
  pgtenant self-signed-cert --dir "$TLS" --name localhost --name 127.0.0.1 >/dev/null
fi
for _ in $(seq 1 60); do
  pgtenant registry init --config "$CONFIG" && break
  echo "waiting for the registry database..." >&2
  sleep 1
done
printf '%s' "$PGTENANT_REGISTRY_PASSWORD" |
  pgtenant server add main --host "${PGTENANT_SERVER_HOST:-postgres}" --port 5432 \
    --admin-password-stdin --config "$CONFIG"
# Sample tenants like `pgtenant demo`'s, client password "demo" (an existing tenant is kept).
for spec in acme:database globex:database initech:schema umbrella:schema hooli:row piedpiper:row; do
  id=${spec%%:*} tier=${spec##*:}
  if ! pgtenant tenant show "$id" --config "$CONFIG" >/dev/null 2>&1; then
    printf 'demo' | pgtenant tenant create "$id" --tier "$tier" --server main \
      --password-stdin --config "$CONFIG"
  fi
done
exec "$@"
