#!/usr/bin/env bash
# Runs every test: installs what is missing, starts the test stack (ClickHouse, Cube, and the
# gateway whose key Cube trusts) on its own ports, runs the suites, and stops it all again.
# It never touches the demo profile, so it works whether or not the demo is running.

set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

started=$SECONDS
scripts/stack.sh install

# Cube's own JavaScript client, which the tests drive against the gateway.
client=tests/cube-client
stamp=$client/node_modules/.installed-lock.sha256
hash=$(cat "$client/package.json" "$client/package-lock.json" | sha256sum | cut -d' ' -f1)
if [[ ! -f $stamp || $(cat "$stamp") != "$hash" ]]; then
  echo "test: installing Cube's client (npm ci)" >&2
  (cd "$client" && npm ci --no-audit --no-fund --silent)
  echo "$hash" >"$stamp"
fi

echo "test: building" >&2
cargo build --locked --workspace --all-targets

cleanup() {
  scripts/gateway.sh down test || true
  scripts/stack.sh down test || true
}
trap cleanup EXIT

scripts/stack.sh up test
MONITOR_GATEWAY_BIN=$PWD/target/debug/monitor-gateway scripts/gateway.sh up test

export MG_TEST_CLICKHOUSE_URL=http://127.0.0.1:28123
export MG_TEST_CUBE_URL=http://127.0.0.1:24000
export MG_TEST_SIGNING_KEY="$PWD/.stack/test/keys/gateway-signing.pem"

if cargo nextest --version >/dev/null 2>&1; then
  cargo nextest run --locked --workspace --no-fail-fast "$@"
else
  cargo test --locked --workspace --no-fail-fast "$@"
fi
echo "test: finished in $((SECONDS - started))s, build and stack start included" >&2
