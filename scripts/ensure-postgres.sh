#!/usr/bin/env bash
# ensure-postgres.sh — make a throw-away PostgreSQL server available for the integration tests.
#
# Idempotent: run it as often as you like. It
#   1. finds the PostgreSQL server binaries (/usr/lib/postgresql/<major>/bin), installing the Debian
#      `postgresql` package when they are missing and we are root;
#   2. creates a cluster in $ENCLAVE_PG_DIR (default /tmp/enclave-pg) owned by the `postgres` OS user
#      (initdb refuses to run as root) unless one is already there;
#   3. starts it on 127.0.0.1:$ENCLAVE_PG_PORT (default 54329, not 5432, so it never clashes with a
#      system cluster), with its unix socket inside the data directory, unless it is already running;
#   4. creates (or repairs) the role `enclave` / password `enclave` and the database `enclave_test`
#      owned by it.
#
# Progress goes to stderr; stdout carries exactly one line, the SQLAlchemy URL of the database:
#   postgresql+psycopg://enclave:enclave@127.0.0.1:54329/enclave_test
#
# Stop the server with:  runuser -u postgres -- /usr/lib/postgresql/15/bin/pg_ctl -D /tmp/enclave-pg stop
set -euo pipefail

PGDATA_DIR="${ENCLAVE_PG_DIR:-/tmp/enclave-pg}"
PG_PORT="${ENCLAVE_PG_PORT:-54329}"
PG_HOST=127.0.0.1
DB_NAME=enclave_test
DB_USER=enclave
DB_PASSWORD=enclave

log() { printf '[ensure-postgres] %s\n' "$*" >&2; }
die() { printf '[ensure-postgres] ERROR: %s\n' "$*" >&2; exit 1; }

# The server must not see a relative path: commands below run from "/".
PGDATA_DIR="$(realpath -m -- "$PGDATA_DIR")"

# --- 1. locate (or install) the server binaries ------------------------------------------------

# Print the bin directory of the newest PostgreSQL under /usr/lib/postgresql, or of the major
# version an existing data directory was created with (its binaries must match PG_VERSION).
find_pg_bin() {
    if [[ -f "$PGDATA_DIR/PG_VERSION" ]]; then
        local want
        want="$(cat "$PGDATA_DIR/PG_VERSION")"
        if [[ -x "/usr/lib/postgresql/$want/bin/pg_ctl" ]]; then
            echo "/usr/lib/postgresql/$want/bin"
            return 0
        fi
    fi
    local dir
    dir="$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1 || true)"
    if [[ -n "$dir" && -x "$dir/initdb" && -x "$dir/pg_ctl" ]]; then
        echo "$dir"
        return 0
    fi
    # Not Debian's layout: accept binaries on PATH (e.g. a source build in /usr/local/bin).
    if command -v initdb >/dev/null && command -v pg_ctl >/dev/null; then
        dirname "$(command -v pg_ctl)"
        return 0
    fi
    return 1
}

if ! PG_BIN="$(find_pg_bin)"; then
    if [[ "$(id -u)" -ne 0 ]]; then
        die "PostgreSQL server binaries (initdb, pg_ctl) not found and not running as root;" \
            "install them with: sudo apt-get install -y postgresql"
    fi
    log "PostgreSQL not found; installing the Debian package (apt-get install postgresql)"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update >&2
    apt-get install -y --no-install-recommends postgresql >&2
    PG_BIN="$(find_pg_bin)" || die "postgresql installed but initdb/pg_ctl still not found"
fi
for tool in initdb pg_ctl pg_isready psql; do
    [[ -x "$PG_BIN/$tool" ]] || die "$PG_BIN/$tool is missing"
done
log "using PostgreSQL binaries in $PG_BIN ($("$PG_BIN/pg_ctl" --version))"

# --- how to run a command as the cluster's owner -------------------------------------------------

if [[ "$(id -u)" -eq 0 ]]; then
    # Root: the cluster belongs to the `postgres` OS user (the Debian package creates it).
    if ! id postgres >/dev/null 2>&1; then
        log "creating the 'postgres' system user"
        useradd --system --user-group --home-dir /var/lib/postgresql --shell /bin/bash postgres
    fi
    PG_OS_USER=postgres
    # cd / first: the postgres user usually cannot enter root's working directory.
    as_owner() { (cd / && runuser -u postgres -- "$@"); }
else
    # Not root: the cluster simply belongs to whoever runs this script.
    PG_OS_USER="$(id -un)"
    as_owner() { (cd / && "$@"); }
fi

# psql as the bootstrap superuser, over the unix socket in the data directory (trust auth).
psql_admin() {
    as_owner "$PG_BIN/psql" -X -q -v ON_ERROR_STOP=1 -h "$PGDATA_DIR" -p "$PG_PORT" \
        -U postgres -d postgres "$@"
}

# --- 2. create the cluster if needed -------------------------------------------------------------

if [[ ! -f "$PGDATA_DIR/PG_VERSION" ]]; then
    log "creating a new cluster in $PGDATA_DIR (owner: $PG_OS_USER)"
    mkdir -p "$PGDATA_DIR"
    if [[ "$(id -u)" -eq 0 ]]; then
        chown "$PG_OS_USER": "$PGDATA_DIR"
    fi
    chmod 700 "$PGDATA_DIR"
    as_owner test -w "$PGDATA_DIR" \
        || die "$PG_OS_USER cannot write to $PGDATA_DIR (is a parent directory private?);" \
               "point ENCLAVE_PG_DIR somewhere else"
    # C.UTF-8 always exists on Debian, whatever locales are (not) generated on the machine.
    # Local (unix socket) connections are trusted: the socket lives in the 0700 data directory,
    # so only the owner can reach it. TCP connections need a password.
    as_owner "$PG_BIN/initdb" -D "$PGDATA_DIR" -U postgres --encoding=UTF8 --locale=C.UTF-8 \
        --auth-local=trust --auth-host=scram-sha-256 --no-instructions >&2
    # Settings live in the cluster itself, so a plain `pg_ctl start` later brings back the same server.
    as_owner tee -a "$PGDATA_DIR/postgresql.conf" >/dev/null <<CONF

# --- added by scripts/ensure-postgres.sh (Enclave test server) ---
listen_addresses = '$PG_HOST'
port = $PG_PORT
unix_socket_directories = '$PGDATA_DIR'
# A disposable test server: trade durability for speed.
fsync = off
synchronous_commit = off
full_page_writes = off
CONF
else
    log "cluster already exists in $PGDATA_DIR"
fi

# --- 3. start it unless it is running ------------------------------------------------------------

if as_owner "$PG_BIN/pg_ctl" -D "$PGDATA_DIR" status >/dev/null 2>&1; then
    log "server already running"
else
    if "$PG_BIN/pg_isready" -q -h "$PG_HOST" -p "$PG_PORT"; then
        die "another PostgreSQL server already listens on $PG_HOST:$PG_PORT (not the one in" \
            "$PGDATA_DIR); stop it or set ENCLAVE_PG_DIR to its data directory"
    fi
    log "starting the server on $PG_HOST:$PG_PORT (log: $PGDATA_DIR/server.log)"
    if ! as_owner "$PG_BIN/pg_ctl" -D "$PGDATA_DIR" -l "$PGDATA_DIR/server.log" -w -t 60 start >&2; then
        tail -n 30 "$PGDATA_DIR/server.log" >&2 || true
        die "the server did not start"
    fi
fi

# Wait until it accepts TCP connections (pg_ctl -w already waited; this also covers a server that
# was still starting when we found it "running").
for _ in $(seq 1 60); do
    if "$PG_BIN/pg_isready" -q -h "$PG_HOST" -p "$PG_PORT"; then
        break
    fi
    sleep 1
done
"$PG_BIN/pg_isready" -q -h "$PG_HOST" -p "$PG_PORT" \
    || die "server does not answer on $PG_HOST:$PG_PORT (see $PGDATA_DIR/server.log)"

# --- 4. role and database ------------------------------------------------------------------------

if [[ "$(psql_admin -tAc "SELECT 1 FROM pg_roles WHERE rolname = '$DB_USER'")" != 1 ]]; then
    log "creating role $DB_USER"
    psql_admin -c "CREATE ROLE $DB_USER LOGIN CREATEDB PASSWORD '$DB_PASSWORD'" >&2
else
    # Re-assert login and password, in case someone changed them.
    psql_admin -c "ALTER ROLE $DB_USER LOGIN CREATEDB PASSWORD '$DB_PASSWORD'" >&2
fi

if [[ "$(psql_admin -tAc "SELECT 1 FROM pg_database WHERE datname = '$DB_NAME'")" != 1 ]]; then
    log "creating database $DB_NAME"
    psql_admin -c "CREATE DATABASE $DB_NAME OWNER $DB_USER" >&2
else
    psql_admin -c "ALTER DATABASE $DB_NAME OWNER TO $DB_USER" >&2
fi
# PostgreSQL 15 no longer lets every role create objects in `public`; the owner of the database
# should own its public schema too.
psql_admin -d "$DB_NAME" -c "ALTER SCHEMA public OWNER TO $DB_USER" >&2

log "ready"
echo "postgresql+psycopg://$DB_USER:$DB_PASSWORD@$PG_HOST:$PG_PORT/$DB_NAME"
