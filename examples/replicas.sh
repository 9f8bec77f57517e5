#!/usr/bin/env bash
# Three batchgate replicas on one PostgreSQL and one S3 bucket (moto), all on this machine.
#
#   examples/replicas.sh            start everything; Ctrl-C stops it all and removes the data
#   examples/replicas.sh --check    start everything, run one batch across the replicas (uploaded
#                                   through the first, created through the second, watched and
#                                   downloaded through the third), check its answers, stop
#
# Needs the PostgreSQL server binaries (apt-get install postgresql), moto's server (pip install
# "moto[server]", a dev dependency), batchgate-server and the batchgate command on the PATH
# (`export PATH=$PWD/.venv/bin:$PATH` after `make install`). The replicas listen on
# 127.0.0.1:50051, :50052 and :50053 (BATCHGATE_PORT_BASE=50050); talk to any of them for any call, e.g.
#   BATCHGATE_ADDRESS=127.0.0.1:50052 BATCHGATE_API_KEY=$BATCHGATE_MASTER_KEY batchgate batches ls
# and try `kill -9` on one: within the lease timeout another takes its batches over.
set -euo pipefail

CHECK=""
case "${1:-}" in
  --check) CHECK=1 ;;
  "") ;;
  *) echo "usage: $0 [--check]" >&2; exit 2 ;;
esac

HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(mktemp -d /tmp/batchgate-replicas-XXXXXX)
INITDB=$(ls /usr/lib/postgresql/*/bin/initdb 2>/dev/null | sort -V | tail -1 || true)
if [ -z "$INITDB" ]; then
  echo "no PostgreSQL server binaries under /usr/lib/postgresql (apt-get install postgresql)" >&2
  exit 1
fi
PG_BIN=$(dirname "$INITDB")
PG_PORT=${PG_PORT:-55432}
S3_PORT=${S3_PORT:-55000}
PORT_BASE=${BATCHGATE_PORT_BASE:-50050}
BUCKET=batchgate-example
export BATCHGATE_MASTER_KEY=${BATCHGATE_MASTER_KEY:-sk-example-master}
PIDS=()

# PostgreSQL refuses to run as root: as root, run it as the postgres user.
as_pg() { if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi; }

# Try `$@` every 0.2 s until it succeeds, for at most 60 s.
until_ok() {
  local tries=300
  until "$@" >/dev/null 2>&1; do
    tries=$((tries - 1))
    if [ "$tries" = 0 ]; then echo "gave up waiting for: $*" >&2; return 1; fi
    sleep 0.2
  done
}

cleanup() {
  for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
  as_pg "$PG_BIN/pg_ctl" stop -D "$ROOT/pg" -m fast >/dev/null 2>&1 || true
  rm -rf "$ROOT"
}
trap cleanup EXIT
trap 'exit 130' INT TERM  # leave through the EXIT trap, once

mkdir -p "$ROOT/pg"
if [ "$(id -u)" = 0 ]; then chown postgres "$ROOT" "$ROOT/pg"; fi
as_pg "$PG_BIN/initdb" -D "$ROOT/pg" -U postgres --auth=trust >/dev/null
as_pg "$PG_BIN/pg_ctl" start -w -D "$ROOT/pg" -l "$ROOT/pg/server.log" \
  -o "-c listen_addresses=127.0.0.1 -c port=$PG_PORT -c unix_socket_directories=$ROOT/pg" >/dev/null
as_pg "$PG_BIN/psql" -h 127.0.0.1 -p "$PG_PORT" -U postgres -qc "CREATE DATABASE batchgate"

moto_server -H 127.0.0.1 -p "$S3_PORT" >"$ROOT/moto.log" 2>&1 &
PIDS+=($!)
export AWS_ACCESS_KEY_ID=testing AWS_SECRET_ACCESS_KEY=testing AWS_DEFAULT_REGION=us-east-1
export BATCHGATE_S3_ENDPOINT_URL=http://127.0.0.1:$S3_PORT
until_ok curl -sf -X PUT "$BATCHGATE_S3_ENDPOINT_URL/$BUCKET"

# Every replica: its own data directory (scratch space, its replica id), the same database and bucket.
export BATCHGATE_DATABASE_URL=postgresql://postgres@127.0.0.1:$PG_PORT/batchgate
export BATCHGATE_BLOB_URL=s3://$BUCKET/batchgate
ADDRESSES=()
for i in 1 2 3; do
  ADDRESSES+=("127.0.0.1:$((PORT_BASE + i))")
  batchgate-server --address "${ADDRESSES[-1]}" --data-dir "$ROOT/replica-$i" --lease-timeout 10 \
    ${BATCHGATE_CONFIG:+--config "$BATCHGATE_CONFIG"} >"$ROOT/replica-$i.log" 2>&1 &
  PIDS+=($!)
done
export BATCHGATE_API_KEY=$BATCHGATE_MASTER_KEY
for address in "${ADDRESSES[@]}"; do until_ok batchgate --address "$address" batches ls; done
echo "three replicas on ${ADDRESSES[*]} (PostgreSQL :$PG_PORT, S3 :$S3_PORT; logs in $ROOT)"

if [ -n "$CHECK" ]; then
  head -n 50 "$HERE/support_tickets.jsonl" >"$ROOT/requests.jsonl"
  json_id() { python3 -c 'import json, sys; print(json.load(sys.stdin)["id"])'; }
  file_id=$(batchgate --json --address "${ADDRESSES[0]}" files upload "$ROOT/requests.jsonl" | json_id)
  batch_id=$(batchgate --json --address "${ADDRESSES[1]}" batches create "$file_id" --model simulated | json_id)
  batchgate --address "${ADDRESSES[2]}" batches watch "$batch_id" -o "$ROOT/results.jsonl"
  answered=$(wc -l <"$ROOT/results.jsonl")
  if [ "$answered" != 50 ]; then echo "check failed: $answered answers of 50" >&2; exit 1; fi
  echo "check passed: batch $batch_id, 50 requests answered across three replicas"
  exit 0
fi
echo "Ctrl-C stops them"
wait
