#!/usr/bin/env bash
# What authentication costs, measured side by side in one run on loopback.
#
# Drives four requests at the same concurrency with wrk and prints requests per second and
# p50/p99 latency for each, with ratios:
#
#   no-auth     GET /.well-known/jwks.json: a route without authentication (static body)
#   no-auth-err GET /v1/product-analytics/unknown: no authentication, a JSON error body like the
#               authenticated case's, so the difference between the two is authentication alone
#   cache-on    GET /v1/product-analytics/projects/0 with a valid token: full Cloud Connector
#               checks answered from the verified-token cache, then a cheap 400 (invalid id)
#   cache-off   the same against a second gateway with auth.token_cache_capacity = 0, so every
#               request verifies the RSA signature
#
# Both measured routes stop before ClickHouse or Cube, so only the gateway and a local issuer
# run. Rounds are interleaved and medians reported, because this machine is noisy.
#
#   benches/auth.sh                  # CONCURRENCY=32 DURATION=10 ROUNDS=3 THREADS=1
#
# The load stays on 127.0.0.1 and every wrk run stops by itself after DURATION seconds.

set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

readonly CONCURRENCY=${CONCURRENCY:-32}
readonly DURATION=${DURATION:-10}
readonly ROUNDS=${ROUNDS:-3}
readonly THREADS=${THREADS:-1}
readonly ISSUER_PORT=47081 CACHE_ON_PORT=47080 CACHE_ON_ADMIN=47090 CACHE_OFF_PORT=47082 CACHE_OFF_ADMIN=47092

if ! command -v wrk >/dev/null; then
  echo "bench: installing wrk" >&2
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq wrk >/dev/null
fi
cargo build --release --locked --bin monitor-gateway >&2
readonly BIN=$PWD/target/release/monitor-gateway

work=$(mktemp -d)
pids=()
cleanup() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT

"$BIN" dev issuer-init --dir "$work/issuer" 2>/dev/null
"$BIN" dev issuer-serve --dir "$work/issuer" --listen "127.0.0.1:$ISSUER_PORT" \
  --issuer "http://127.0.0.1:$ISSUER_PORT" 2>/dev/null &
pids+=($!)

start_gateway() { # port admin_port cache_capacity
  cat >"$work/gateway-$1.toml" <<TOML
[server]
listen = "127.0.0.1:$1"
admin_listen = "127.0.0.1:$2"
[log]
level = "warn"
[auth]
token_cache_capacity = $3
[[auth.issuers]]
name = "local"
issuer = "http://127.0.0.1:$ISSUER_PORT"
jwks_url = "http://127.0.0.1:$ISSUER_PORT/oauth/discovery/keys"
[signing]
key_file = "$work/signing.pem"
create_if_missing = true
TOML
  "$BIN" --config "$work/gateway-$1.toml" serve >"$work/gateway-$1.log" 2>&1 &
  pids+=($!)
  # Ready enough for these routes once the issuer's keys are loaded.
  for _ in $(seq 1 100); do
    curl -s "http://127.0.0.1:$2/readyz" 2>/dev/null | grep '"local":1' >/dev/null && return 0
    sleep 0.1
  done
  cat "$work/gateway-$1.log" >&2
  echo "bench: gateway on $1 did not load the issuer's keys" >&2
  exit 1
}
start_gateway "$CACHE_ON_PORT" "$CACHE_ON_ADMIN" 100000
start_gateway "$CACHE_OFF_PORT" "$CACHE_OFF_ADMIN" 0

instance=$(python3 -c 'import uuid; print(uuid.uuid4())')
token=$("$BIN" dev token --dir "$work/issuer" --instance-id "$instance" --issuer "http://127.0.0.1:$ISSUER_PORT")
auth=(-H "Authorization: Bearer $token" -H "X-Gitlab-Instance-Id: $instance")
authenticated=/v1/product-analytics/projects/0

# A valid token really is accepted on the measured route (400 comes after authentication).
for port in "$CACHE_ON_PORT" "$CACHE_OFF_PORT"; do
  code=$(curl -s -o /dev/null -w '%{http_code}' "${auth[@]}" "http://127.0.0.1:$port$authenticated")
  [[ $code == 400 ]] || { echo "bench: expected 400 after authentication, got $code" >&2; exit 1; }
done

run() { # name url [headers...]
  local name=$1 url=$2
  shift 2
  wrk -t "$THREADS" -c "$CONCURRENCY" -d "${DURATION}s" --latency "$@" "$url" >"$work/$name.$round.txt"
}

echo "bench: $ROUNDS rounds of ${DURATION}s per case, $CONCURRENCY connections, $THREADS wrk thread(s)" >&2
for round in $(seq 1 "$ROUNDS"); do
  run no-auth "http://127.0.0.1:$CACHE_ON_PORT/.well-known/jwks.json"
  if grep -q "Non-2xx" "$work/no-auth.$round.txt"; then
    cat "$work/no-auth.$round.txt" >&2
    echo "bench: the JWKS route answered errors" >&2
    exit 1
  fi
  run no-auth-err "http://127.0.0.1:$CACHE_ON_PORT/v1/product-analytics/unknown"
  run cache-on "http://127.0.0.1:$CACHE_ON_PORT$authenticated" "${auth[@]}"
  run cache-off "http://127.0.0.1:$CACHE_OFF_PORT$authenticated" "${auth[@]}"
done

python3 - "$work" "$ROUNDS" <<'PY'
import sys
sys.path.insert(0, "benches")
from wrk_summary import medians, print_table

results = medians(sys.argv[1], int(sys.argv[2]), ("no-auth", "no-auth-err", "cache-on", "cache-off"))
print_table(results)
static, err = results["no-auth"][0], results["no-auth-err"][0]
on, off = results["cache-on"][0], results["cache-off"][0]
print(f"cache-on  / no-auth-err : {on / err:.3f}  (authentication costs {100 * (1 - on / err):.1f}% of throughput; target < 10%)")
print(f"cache-on  / no-auth     : {on / static:.3f}  (authentication plus a JSON error body: {100 * (1 - on / static):.1f}%)")
print(f"cache-off / no-auth-err : {off / err:.3f}")
print(f"cache-on  / cache-off   : {on / off:.1f}x")
PY
