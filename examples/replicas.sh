#!/usr/bin/env bash
# Three batchgate replicas on one PostgreSQL and one S3 bucket (moto), all on this machine.
#
#   examples/replicas.sh            start everything; Ctrl-C stops it all and removes the data
#
# Needs the PostgreSQL server binaries (apt-get install postgresql), moto's server (pip install
# "moto[server]", a dev dependency) and batchgate-server on the PATH. The replicas listen on
# 127.0.0.1:50051, :50052 and :50053; talk to any of them for any call, e.g.
#   BATCHGATE_ADDRESS=127.0.0.1:50052 BATCHGATE_API_KEY=$BATCHGATE_MASTER_KEY batchgate batches list
# and try `kill -9` on one: within the lease timeout another takes its batches over.
set -euo pipefail

ROOT=$(mktemp -d /tmp/batchgate-replicas-XXXXXX)
PG_BIN=$(dirname "$(ls /usr/lib/postgresql/*/bin/initdb | sort -V | tail -1)")
PG_PORT=${PG_PORT:-55432}
S3_PORT=${S3_PORT:-55000}
BUCKET=batchgate-example
export BATCHGATE_MASTER_KEY=${BATCHGATE_MASTER_KEY:-sk-example-master}
PIDS=()

# PostgreSQL refuses to run as root: as root, run it as the postgres user.
as_pg() { if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi; }

cleanup() {
  for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
  as_pg "$PG_BIN/pg_ctl" stop -D "$ROOT/pg" -m fast >/dev/null 2>&1 || true
  rm -rf "$ROOT"
}
trap cleanup EXIT INT TERM

mkdir -p "$ROOT/pg"
[ "$(id -u)" = 0 ] && chown postgres "$ROOT" "$ROOT/pg"
as_pg "$PG_BIN/initdb" -D "$ROOT/pg" -U postgres --auth=trust >/dev/null
as_pg "$PG_BIN/pg_ctl" start -w -D "$ROOT/pg" -l "$ROOT/pg/server.log" \
  -o "-c listen_addresses=127.0.0.1 -c port=$PG_PORT -c unix_socket_directories=$ROOT/pg" >/dev/null
as_pg "$PG_BIN/psql" -h 127.0.0.1 -p "$PG_PORT" -U postgres -qc "CREATE DATABASE batchgate"

moto_server -H 127.0.0.1 -p "$S3_PORT" >"$ROOT/moto.log" 2>&1 &
PIDS+=($!)
export AWS_ACCESS_KEY_ID=testing AWS_SECRET_ACCESS_KEY=testing AWS_DEFAULT_REGION=us-east-1
export BATCHGATE_S3_ENDPOINT_URL=http://127.0.0.1:$S3_PORT
until curl -sf -X PUT "$BATCHGATE_S3_ENDPOINT_URL/$BUCKET" >/dev/null; do sleep 0.2; done

# Every replica: its own data directory (scratch space, its replica id), the same database and bucket.
export BATCHGATE_DATABASE_URL=postgresql://postgres@127.0.0.1:$PG_PORT/batchgate
export BATCHGATE_BLOB_URL=s3://$BUCKET/batchgate
for i in 1 2 3; do
  batchgate-server --address "127.0.0.1:5005$i" --data-dir "$ROOT/replica-$i" --lease-timeout 10 \
    ${BATCHGATE_CONFIG:+--config "$BATCHGATE_CONFIG"} &
  PIDS+=($!)
done
echo "three replicas on 127.0.0.1:50051-50053 (PostgreSQL :$PG_PORT, S3 :$S3_PORT); Ctrl-C stops them"
wait
