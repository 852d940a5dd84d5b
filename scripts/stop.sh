#!/usr/bin/env bash
# Stops everything the project's scripts started: gateways, local issuers, Cube and ClickHouse,
# for both the demo and the test profile. Data of the demo profile is kept in .stack/demo.

set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

for profile in demo test; do
  scripts/gateway.sh down "$profile"
  scripts/stack.sh down "$profile"
done
