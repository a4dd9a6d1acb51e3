#!/usr/bin/env bash
# The whole test suite against real PostgreSQL and Redis (brought up first),
# plus the formatting and lint checks. Usage: scripts/test.sh [cargo test args]
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/services.sh --test loyaltyd_test
# Tests connect over the local socket: no password on a fresh install either.
export DATABASE_URL="postgres://root@localhost/loyaltyd_test?host=/var/run/postgresql"
export REDIS_URL="redis://127.0.0.1:6379/"
# Each test creates its own database; clear the ones earlier runs kept.
psql -h /var/run/postgresql -U root -d postgres -tAc \
    "SELECT 'DROP DATABASE \"' || datname || '\";' FROM pg_database WHERE datname LIKE '_sqlx_test_%'" \
    | psql -q -h /var/run/postgresql -U root -d postgres >/dev/null 2>&1 || true
cargo fmt --all -- --check
cargo clippy --all-targets --quiet -- -D warnings
# Library, binary and integration tests. Not --all-targets: that would also run
# the benchmark binary at full size in a debug build; the suite runs its small
# mode instead (tests/it/bench.rs), and clippy above compiles every target.
cargo test --lib --bins --tests "$@"
