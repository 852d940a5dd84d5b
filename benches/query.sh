#!/usr/bin/env bash
# The query path's overhead: the same Cube `load` sent straight to Cube, through the gateway with
# its result cache off, and with it on, at the same concurrency in one run, with throughput,
# p50/p99 latency, the ratios and the latency the gateway adds. Cube answers this repeated query
# from its own result cache, so the cache-off comparison isolates what the gateway adds.
#
#   benches/query.sh     # CONCURRENCY=16 DURATION=10 ROUNDS=3 THREADS=1
#
# Uses the demo profile (scripts/demo.sh brings it up with a project and sample events) and a
# gateway of its own on 127.0.0.1:47280, sharing the demo gateway's signing key so Cube trusts
# it, with rate limits, the per-instance share and queue bounds raised out of the way. wrk runs
# stop by themselves.

set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

readonly CONCURRENCY=${CONCURRENCY:-16} DURATION=${DURATION:-10} ROUNDS=${ROUNDS:-3}
readonly THREADS=${THREADS:-1}

command -v wrk >/dev/null || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq wrk >/dev/null; }
scripts/demo.sh >/dev/null
readonly BIN=$PWD/target/release/monitor-gateway
instance=$(cat .stack/demo/instance-id)

work=$(mktemp -d)
pids=()
cleanup() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT

start_gateway() { # port admin_port result_cache_seconds
  cat >"$work/gateway-$1.toml" <<TOML
[server]
listen = "127.0.0.1:$1"
admin_listen = "127.0.0.1:$2"
[log]
level = "warn"
[tenants]
query_rate_per_second = 1000000.0
query_burst = 1000000
max_concurrent_queries = 100000
[cube]
url = "http://127.0.0.1:14000"
max_concurrent_queries = 64
max_queued_queries = 1024
result_cache_seconds = $3
[clickhouse]
url = "http://127.0.0.1:18123"
[[auth.issuers]]
name = "local"
issuer = "http://127.0.0.1:8081"
jwks_url = "http://127.0.0.1:8081/oauth/discovery/keys"
[signing]
key_file = "$PWD/.stack/demo/keys/gateway-signing.pem"
create_if_missing = false
TOML
  "$BIN" --config "$work/gateway-$1.toml" serve >"$work/gateway-$1.log" 2>&1 &
  pids+=($!)
  for _ in $(seq 1 100); do curl -sf "http://127.0.0.1:$2/readyz" >/dev/null && return 0; sleep 0.1; done
  tail -n 20 "$work/gateway-$1.log" >&2
  echo "bench: the gateway on $1 did not become ready" >&2
  exit 1
}
start_gateway 47280 47290 0
start_gateway 47282 47292 5

token=$(scripts/gateway.sh token demo "$instance")
# Long enough for the whole run; the gateway itself signs one-minute tokens.
context=$(MONITOR_GATEWAY__CUBE__TOKEN_TTL_SECONDS=3600 "$BIN" --config "$work/gateway-47280.toml" dev context-token --instance-id "$instance" --project-id 1)
query=$(python3 -c 'import json, urllib.parse; print(urllib.parse.quote(json.dumps({"measures": ["TrackedEvents.count", "TrackedEvents.pageViewsCount"], "dimensions": ["TrackedEvents.pageUrlpath"]})))')
direct="http://127.0.0.1:14000/cubejs-api/v1/load?query=$query"
gateway="http://127.0.0.1:47280/v1/product-analytics/projects/1/cubejs-api/v1/load?query=$query"
cached="http://127.0.0.1:47282/v1/product-analytics/projects/1/cubejs-api/v1/load?query=$query"

# Both paths must answer with data (not "Continue wait", not an error) before measuring.
for url_auth in "$direct|Authorization: $context" "$gateway|Authorization: Bearer $token" \
  "$cached|Authorization: Bearer $token"; do
  url=${url_auth%%|*} auth=${url_auth#*|}
  for _ in $(seq 1 60); do
    body=$(curl -s "$url" -H "$auth" -H "X-Gitlab-Instance-Id: $instance")
    [[ $body == *'"data"'* ]] && break
    sleep 0.5
  done
  [[ $body == *'"data"'* ]] || { echo "bench: no data from $url: $body" >&2; exit 1; }
done

run() { # name url headers...
  local name=$1 url=$2
  shift 2
  wrk -t "$THREADS" -c "$CONCURRENCY" -d "${DURATION}s" --latency "$@" "$url" >"$work/$name.$round.txt"
  if grep -q "Non-2xx" "$work/$name.$round.txt"; then
    cat "$work/$name.$round.txt" >&2
    echo "bench: $name had error responses" >&2
    exit 1
  fi
}

echo "bench: $ROUNDS rounds of ${DURATION}s per path, $CONCURRENCY connections" >&2
for round in $(seq 1 "$ROUNDS"); do
  run direct "$direct" -H "Authorization: $context"
  run gateway "$gateway" -H "Authorization: Bearer $token" -H "X-Gitlab-Instance-Id: $instance"
  run cached "$cached" -H "Authorization: Bearer $token" -H "X-Gitlab-Instance-Id: $instance"
done

python3 - "$work" "$ROUNDS" <<'PY'
import sys
sys.path.insert(0, "benches")
from wrk_summary import medians, print_table

results = medians(sys.argv[1], int(sys.argv[2]), ("direct", "gateway", "cached"))
print_table(results)
(d_rps, d_p50, _), (g_rps, g_p50, _) = results["direct"], results["gateway"]
c_rps = results["cached"][0]
print(f"gateway (cache off) / direct throughput: {g_rps / d_rps:.3f}   (target >= 0.95)")
print(f"added latency at p50 (cache off)       : {g_p50 - d_p50:.3f} ms   (target < 1 ms)")
print(f"gateway (cache on) / direct throughput : {c_rps / d_rps:.1f}x   (target >= 10x)")
PY
