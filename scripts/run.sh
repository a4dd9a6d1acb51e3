#!/usr/bin/env bash
# Brings up PostgreSQL and Redis, builds loyaltyd, applies the migrations,
# seeds a small demo forum if the database is empty, and runs the daemon in
# the foreground with config.toml. Usage: scripts/run.sh
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/services.sh loyaltyd
export LOYALTYD_DATABASE__URL="${LOYALTYD_DATABASE__URL:-postgres://root@localhost/loyaltyd?host=/var/run/postgresql}"
cargo build --release --quiet
bin=target/release/loyaltyd
"$bin" --config config.toml migrate
users=$(psql -h /var/run/postgresql -U root -d loyaltyd -tAc "SELECT count(*) FROM users")
if [ "$users" = "0" ]; then
    "$bin" --config config.toml demo seed --users 10000 --events 200000 --queue-items 1000
fi
exec "$bin" --config config.toml run
