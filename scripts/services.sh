#!/usr/bin/env bash
# Installs (from Debian's packages) and starts what the integration tests need:
# Redis and PostgreSQL. Prints the environment the tests read, for `eval`.
set -euo pipefail

need_install=()
command -v redis-server >/dev/null 2>&1 || need_install+=(redis-server)
ls /usr/lib/postgresql/*/bin/postgres >/dev/null 2>&1 || need_install+=(postgresql)
if [ ${#need_install[@]} -gt 0 ]; then
  echo "installing ${need_install[*]} from Debian's packages" >&2
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq >&2
  apt-get install -y -qq "${need_install[@]}" >&2
fi

# PostgreSQL: the Debian cluster if there is one, else a private cluster owned by `postgres`.
PGPORT=${DMIPRO_PGPORT:-5433}
PGDATA=${DMIPRO_PGDATA:-/tmp/dmipro-pgdata}
PGBIN=$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -n 1)
if ! "$PGBIN/pg_isready" -h 127.0.0.1 -p "$PGPORT" -q 2>/dev/null; then
  id postgres >/dev/null 2>&1 || useradd --system --home /var/lib/postgresql postgres
  if [ ! -f "$PGDATA/PG_VERSION" ]; then
    rm -rf "$PGDATA"; mkdir -p "$PGDATA"; chown postgres "$PGDATA"
    su postgres -s /bin/sh -c "$PGBIN/initdb -D $PGDATA -U postgres --auth=trust -E UTF8" >/dev/null
  fi
  su postgres -s /bin/sh -c "$PGBIN/pg_ctl -D $PGDATA -o '-p $PGPORT -k /tmp -c listen_addresses=127.0.0.1 -c max_connections=200 -c fsync=off' -l $PGDATA/server.log -w start" >&2
fi

echo "export DMIPRO_TEST_POSTGRES_URL=postgresql+psycopg://postgres@127.0.0.1:$PGPORT/postgres"
