#!/usr/bin/env bash
# Brings up what loyaltyd needs on a Debian machine, as root: installs
# PostgreSQL and Redis from Debian's packages if they are missing, starts them
# if they are stopped, and makes sure the PostgreSQL role `root` exists (tests
# and the run script connect over the local socket as root). With --test it
# also installs what the tests drive loyaltyd with: Python's psycopg and
# redis-py (the forum handlers of the SQL contract tests, the original
# design's own service code in the adoption tests), Prometheus (promtool
# and a live server), plpgsql_check (the linter of the SQL layer), and
# Java's JDBC driver and PgBouncer (clients as forums run them).
# With --bench, what the benchmark needs beyond the services: replication
# connections for its streaming replica.
# Usage: scripts/services.sh [--test | --bench] [DATABASE...]
set -euo pipefail

log() { printf 'services: %s\n' "$*" >&2; }

test_tools=false
replication=false
case "${1:-}" in
    --test) test_tools=true; replication=true; shift ;;
    --bench) replication=true; shift ;;
esac

missing=()
command -v pg_ctlcluster >/dev/null 2>&1 || missing+=(postgresql)
command -v redis-server >/dev/null 2>&1 || missing+=(redis-server)
if $test_tools; then
    /usr/bin/python3 -c 'import psycopg' >/dev/null 2>&1 || missing+=(python3-psycopg)
    /usr/bin/python3 -c 'import redis' >/dev/null 2>&1 || missing+=(python3-redis)
    command -v promtool >/dev/null 2>&1 || missing+=(prometheus)
    /usr/bin/python3 -c 'import asyncpg' >/dev/null 2>&1 || missing+=(python3-asyncpg)
    command -v systemd-analyze >/dev/null 2>&1 || missing+=(systemd)
    # PL/pgSQL's own linter, for the server's major version (the suite runs
    # it over every function and trigger).
    pg_major=$(ls /usr/lib/postgresql 2>/dev/null | sort -V | tail -n 1)
    pg_major=${pg_major:-15}
    [ -f "/usr/share/postgresql/$pg_major/extension/plpgsql_check.control" ] \
        || missing+=("postgresql-$pg_major-plpgsql-check")
    # A typed client (JDBC) and a connection pooler, as forums run them.
    command -v java >/dev/null 2>&1 || missing+=(default-jdk-headless)
    [ -f /usr/share/java/postgresql.jar ] || missing+=(libpostgresql-jdbc-java)
    command -v pgbouncer >/dev/null 2>&1 || missing+=(pgbouncer)
fi
if ((${#missing[@]})); then
    log "installing ${missing[*]} from Debian's packages"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi

# PostgreSQL: the newest installed cluster, created if the package made none.
if ! pg_isready -q -h /var/run/postgresql; then
    version=$(ls /usr/lib/postgresql | sort -V | tail -n 1)
    if [ -z "$(ls /etc/postgresql/"$version" 2>/dev/null)" ]; then
        log "creating PostgreSQL $version cluster main"
        pg_createcluster "$version" main >/dev/null
    fi
    cluster=$(ls /etc/postgresql/"$version" | head -n 1)
    log "starting PostgreSQL $version/$cluster"
    pg_ctlcluster --skip-systemctl-redirect "$version" "$cluster" start || true
    for _ in $(seq 1 60); do
        pg_isready -q -h /var/run/postgresql && break
        sleep 0.5
    done
    pg_isready -q -h /var/run/postgresql || { log "PostgreSQL did not start"; exit 1; }
fi
if ! su postgres -c "psql -h /var/run/postgresql -tAc \"SELECT 1 FROM pg_roles WHERE rolname = 'root'\"" | grep -q 1; then
    log "creating PostgreSQL role root"
    su postgres -c "createuser -h /var/run/postgresql --superuser root"
fi

# The tests and the benchmark copy the server into a streaming replica
# (pg_basebackup as the postgres user over the local socket): that needs a
# replication entry in pg_hba.conf, which Debian's default has and a trimmed
# one may not.
if $replication; then
    hba=$(psql -h /var/run/postgresql -U root -d postgres -tAc "SHOW hba_file")
    if ! grep -Eq '^[[:space:]]*local[[:space:]]+replication' "$hba"; then
        log "allowing local replication connections (for the streaming replica)"
        printf 'local replication postgres peer\n' >> "$hba"
        psql -h /var/run/postgresql -U root -d postgres -tAc "SELECT pg_reload_conf()" >/dev/null
    fi
fi

# Redis: nothing on disk; it is a cache.
if ! redis-cli -h 127.0.0.1 -p 6379 ping >/dev/null 2>&1; then
    log "starting Redis"
    redis-server --daemonize yes --bind 127.0.0.1 --port 6379 --save "" --appendonly no >/dev/null
    for _ in $(seq 1 40); do
        redis-cli -h 127.0.0.1 -p 6379 ping >/dev/null 2>&1 && break
        sleep 0.25
    done
    redis-cli -h 127.0.0.1 -p 6379 ping >/dev/null 2>&1 || { log "Redis did not start"; exit 1; }
fi

# A database of the given name, if asked for.
for db in "$@"; do
    if ! psql -h /var/run/postgresql -U root -d postgres -tAc "SELECT 1 FROM pg_database WHERE datname = '$db'" | grep -q 1; then
        log "creating database $db"
        createdb -h /var/run/postgresql -U root "$db"
    fi
done
log "PostgreSQL and Redis are up"
