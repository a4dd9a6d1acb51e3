#!/usr/bin/env bash
# The benchmark: loyaltyd against the seed's algorithms and the floor, side by
# side in one run. Creates (and drops) its own scratch database on the server.
# Usage: scripts/bench.sh [--small | --large] [--json] [--only GROUP] | --idle SECS | --soak SECS
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/services.sh --bench
export DATABASE_URL="${DATABASE_URL:-postgres://root@localhost/postgres?host=/var/run/postgresql}"
export REDIS_URL="${REDIS_URL:-redis://127.0.0.1:6379/}"
exec cargo bench --quiet --bench loyaltyd -- "$@"
