#!/bin/sh
# Creates the secret files of compose.yaml in ./secrets (never overwrites one).
# Hex passwords: no character needs escaping in a DSN, and all are 64 characters.
set -eu
cd "$(dirname "$0")"
umask 077
mkdir -p secrets
chmod 700 secrets
for name in clickhouse_password clickhouse_reader_password metrics_password control_secret \
            otlp_tokens grafana_admin_password; do
  if [ ! -s "secrets/$name" ]; then
    openssl rand -hex 32 > "secrets/$name"
  fi
done
# Compose bind-mounts file secrets with their host mode (uid/gid/mode are Swarm-only), and
# the containers run as other users (driftline 10001, prometheus nobody, grafana 472):
# the files must be readable by them; the 0700 folder keeps other host users out.
chmod 644 secrets/*
echo "secrets in $(pwd)/secrets"
