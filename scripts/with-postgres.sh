#!/usr/bin/env bash
# Run a command beside a throwaway PostgreSQL server: a new cluster in a temporary folder, listening
# on 127.0.0.1 at a free port, stopped and removed when the command ends. The command sees
# AUTOTRANSFER_TEST_POSTGRES_URL (the distributed tests run against it). Installs Debian's
# `postgresql` package when no server binaries are found.
#   bash scripts/with-postgres.sh bash scripts/test.sh tests/test_distributed.py
set -euo pipefail

find_bin() {
  local dir
  for dir in $(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V -r); do
    if [ -x "$dir/initdb" ] && [ -x "$dir/pg_ctl" ]; then echo "$dir"; return 0; fi
  done
  if command -v initdb >/dev/null 2>&1 && command -v pg_ctl >/dev/null 2>&1; then
    dirname "$(command -v initdb)"; return 0
  fi
  return 1
}

as_root() { if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi; }

bin=$(find_bin || true)
if [ -z "$bin" ]; then
  echo "with-postgres: installing Debian's postgresql package" >&2
  as_root apt-get update -qq
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null
  bin=$(find_bin)
fi

# initdb refuses to run as root: as root, the server runs as the package's `postgres` user, as on Debian.
data=$(mktemp -d "${TMPDIR:-/tmp}/autotransfer-pg.XXXXXX")
if [ "$(id -u)" -eq 0 ]; then
  chown postgres "$data"
  as_server() { runuser -u postgres -- "$@"; }
else
  as_server() { "$@"; }
fi
port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')

stop() {
  as_server "$bin/pg_ctl" -D "$data/db" -m fast -w stop >/dev/null 2>&1 || true
  rm -rf "$data"
}
trap stop EXIT

as_server "$bin/initdb" -D "$data/db" -U autotransfer --auth=trust -E UTF8 >/dev/null
as_server "$bin/pg_ctl" -D "$data/db" -l "$data/db/server.log" -w \
  -o "-c listen_addresses=127.0.0.1 -p $port -k $data -c max_connections=200" start >/dev/null
"$bin/createdb" -h 127.0.0.1 -p "$port" -U autotransfer autotransfer_test
export AUTOTRANSFER_TEST_POSTGRES_URL="postgresql+psycopg2://autotransfer@127.0.0.1:$port/autotransfer_test"
echo "with-postgres: PostgreSQL $("$bin/postgres" --version | awk '{print $3}') on 127.0.0.1:$port" >&2
"$@"
