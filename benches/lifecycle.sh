#!/usr/bin/env bash
# Onboarding throughput and the memory cost of idle tenants, measured in one run.
#
# 1. Onboarding: N projects through the gateway (PUT, fixed concurrency) against the same DDL
#    sent straight to ClickHouse's HTTP interface at the same concurrency (CREATE DATABASE and
#    the events table, without the registry rows the gateway also writes). Rounds alternate;
#    medians and their ratio are printed.
# 2. Idle tenants: resident memory of a fresh gateway before and after TENANTS instances each
#    made one call, both while their tenant actors are alive and after they stopped when idle
#    and the allocator's decay time (DECAY_SECONDS, jemalloc's default 10 s) has passed. It runs
#    twice, with the verified-token cache on (its entries live until the tokens expire, so they
#    are part of an idle instance's cost) and off (what is left is the gateway's own).
#
#   benches/lifecycle.sh     # PROJECTS=200 CONCURRENCY=8 ROUNDS=3 TENANTS=10000 DECAY_SECONDS=10
#   ONBOARDING=0 benches/lifecycle.sh   # the memory part only
#   MEMORY=0 benches/lifecycle.sh       # the onboarding part only
#   GATEWAY_BIN=/tmp/old/monitor-gateway benches/lifecycle.sh   # another build of the gateway
#
# The gateway's settings can be varied through its environment, for example
# MONITOR_GATEWAY__CLICKHOUSE__REGISTRY_BATCH_WAIT_MS=2.
#
# Runs on the test profile's ClickHouse and Cube (started if needed, stopped again if it started
# them) with its own gateway and issuer on 127.0.0.1:4718x. Every loop is bounded.
#
# ClickHouse's cost per file it creates depends on the filesystem. On ext4 without a journal
# (these machines' disks), creating a file scans past every inode deleted in the last minutes,
# so the figures drift with whatever deleted files before (a wiped test stack, the last round's
# databases). STACK_ROOT=/dev/shm/monitor-gateway-bench keeps the stack's files in memory, which
# gives steadier figures; the onboarding part prints the CPU each side cost ClickHouse.

set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

export PROJECTS=${PROJECTS:-200} CONCURRENCY=${CONCURRENCY:-8} ROUNDS=${ROUNDS:-3}
export TENANTS=${TENANTS:-10000} DECAY_SECONDS=${DECAY_SECONDS:-10}
readonly ONBOARDING=${ONBOARDING:-1} MEMORY=${MEMORY:-1}
readonly PORT=47180 ADMIN=47190 ISSUER_PORT=47181 IDLE_SECONDS=5
export CLICKHOUSE=http://127.0.0.1:28123

# GATEWAY_BIN runs another build instead, to compare two versions side by side.
if [[ -z ${GATEWAY_BIN:-} ]]; then
  cargo build --release --locked --bin monitor-gateway >&2
fi
readonly BIN=${GATEWAY_BIN:-$PWD/target/release/monitor-gateway}

stack_was_up=false
# (grep reads to the end: with -q it could leave stack.sh writing to a closed pipe, which
# pipefail counts as a failure.)
scripts/stack.sh status test 2>/dev/null | grep 'clickhouse: running' >/dev/null && stack_was_up=true
work=$(mktemp -d)
pids=()
cleanup() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
  $stack_was_up || scripts/stack.sh down test >/dev/null 2>&1 || true
  rm -rf "$work"
}
trap cleanup EXIT
$stack_was_up || scripts/stack.sh up test >&2

"$BIN" dev issuer-init --dir "$work/issuer" 2>/dev/null
"$BIN" dev issuer-serve --dir "$work/issuer" --listen "127.0.0.1:$ISSUER_PORT" \
  --issuer "http://127.0.0.1:$ISSUER_PORT" 2>/dev/null &
pids+=($!)

cat >"$work/gateway.toml" <<TOML
[server]
listen = "127.0.0.1:$PORT"
admin_listen = "127.0.0.1:$ADMIN"
[log]
level = "warn"
[tenants]
idle_timeout_seconds = $IDLE_SECONDS
max_projects = 100000
[[auth.issuers]]
name = "local"
issuer = "http://127.0.0.1:$ISSUER_PORT"
jwks_url = "http://127.0.0.1:$ISSUER_PORT/oauth/discovery/keys"
[clickhouse]
url = "$CLICKHOUSE"
[cube]
url = "http://127.0.0.1:24000"
[signing]
key_file = "$work/signing.pem"
create_if_missing = true
TOML
cp "$work/gateway.toml" "$work/gateway-no-token-cache.toml"
printf '[auth]\ntoken_cache_capacity = 0\n' >>"$work/gateway-no-token-cache.toml"

start_gateway() {
  "$BIN" --config "${1:-$work/gateway.toml}" serve >>"$work/gateway.log" 2>&1 &
  GATEWAY_PID=$!
  pids+=("$GATEWAY_PID")
  for _ in $(seq 1 150); do
    curl -sf "http://127.0.0.1:$ADMIN/readyz" >/dev/null && return 0
    sleep 0.2
  done
  tail -n 20 "$work/gateway.log" >&2
  echo "bench: the gateway did not become ready" >&2
  exit 1
}
export GATEWAY=http://127.0.0.1:$PORT
if [[ $ONBOARDING != 0 ]]; then
  start_gateway
  INSTANCE=$(python3 -c 'import uuid; print(uuid.uuid4())')
  export INSTANCE
  TOKEN=$("$BIN" dev token --dir "$work/issuer" --instance-id "$INSTANCE" --issuer "http://127.0.0.1:$ISSUER_PORT")
  export TOKEN
  echo "bench: onboarding $PROJECTS projects x $ROUNDS rounds at concurrency $CONCURRENCY" >&2
  CLICKHOUSE_PID=$(cat "${STACK_ROOT:-.stack}/test/clickhouse/clickhouse.pid") GATEWAY_PID=$GATEWAY_PID \
    python3 benches/lifecycle_onboarding.py
  curl -s "http://127.0.0.1:$ADMIN/metrics" | awk '
    /^monitor_gateway_registry_batch_rows_sum/ { rows = $2 }
    /^monitor_gateway_registry_batch_rows_count/ { inserts = $2 }
    END { if (inserts) printf "  registry INSERTs    : %d for %d rows (%.1f rows each)\n", inserts, rows, rows / inserts }'
  kill "$GATEWAY_PID"; wait "$GATEWAY_PID" 2>/dev/null || true
fi

[[ $MEMORY != 0 ]] || exit 0
echo "bench: memory with $TENANTS idle tenants" >&2
python3 -c 'import uuid; [print(uuid.uuid4()) for _ in range('"$TENANTS"')]' >"$work/instances"
mapfile -t instances <"$work/instances"
args=()
for instance in "${instances[@]}"; do args+=(--instance-id "$instance"); done
"$BIN" dev token --dir "$work/issuer" --issuer "http://127.0.0.1:$ISSUER_PORT" "${args[@]}" >"$work/tokens"
export ADMIN_PORT=$ADMIN IDLE_SECONDS INSTANCES_FILE=$work/instances TOKENS_FILE=$work/tokens
for cache in on off; do
  config=$work/gateway.toml
  [[ $cache == off ]] && config=$work/gateway-no-token-cache.toml
  start_gateway "$config"
  TOKEN_CACHE=$cache GATEWAY_PID=$GATEWAY_PID python3 benches/lifecycle_memory.py
  kill "$GATEWAY_PID"; wait "$GATEWAY_PID" 2>/dev/null || true
done
