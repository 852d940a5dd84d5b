#!/usr/bin/env bash
# The main job on this machine, as a GitLab instance would see it: installs what is missing,
# starts ClickHouse, Cube and the gateway (demo profile), obtains a token from a local issuer,
# onboards a project, loads sample events into its database, asks Cube through the gateway how
# many there are, and leaves the gateway serving. `scripts/stop.sh` stops everything.

set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

readonly PROJECT_ID=${DEMO_PROJECT_ID:-1}
readonly SAMPLE_EVENTS=${DEMO_SAMPLE_EVENTS:-1000}
readonly GATEWAY=http://127.0.0.1:8080
readonly ADMIN=http://127.0.0.1:9090
readonly CLICKHOUSE=http://127.0.0.1:18123

say() { printf '\n==> %s\n' "$*"; }

say "installing and starting ClickHouse and Cube"
scripts/stack.sh up demo

say "building the gateway (release)"
cargo build --release --locked --bin monitor-gateway
export MONITOR_GATEWAY_BIN=$PWD/target/release/monitor-gateway

say "starting the local token issuer and the gateway"
scripts/gateway.sh up demo

# One instance identity per machine, kept so re-runs find the same project.
instance_file=.stack/demo/instance-id
[[ -s $instance_file ]] || python3 -c 'import uuid; print(uuid.uuid4())' >"$instance_file"
instance=$(cat "$instance_file")
token=$(scripts/gateway.sh token demo "$instance")
echo "instance $instance holds a Cloud Connector token (${#token} bytes)"

say "onboarding project $PROJECT_ID"
details=$(curl -fsS -X PUT "$GATEWAY/v1/product-analytics/projects/$PROJECT_ID" \
  -H "Authorization: Bearer $token" -H "X-Gitlab-Instance-Id: $instance")
echo "$details" | python3 -m json.tool
database=$(echo "$details" | python3 -c 'import json,sys; print(json.load(sys.stdin)["database"])')

existing=$(curl -fsS "$CLICKHOUSE/" --data-binary "SELECT count() FROM $database.snowplow_events")
if [[ $existing -gt 0 ]]; then
  say "$database already holds $existing events (loaded by an earlier run)"
else
  say "loading $SAMPLE_EVENTS sample events into $database"
  curl -fsS "$CLICKHOUSE/" --data-binary "
    INSERT INTO $database.snowplow_events
      (app_id, platform, event, event_id, event_name, collector_tstamp, derived_tstamp,
       domain_userid, domain_sessionid, page_urlpath, page_title, br_lang, os_name)
    SELECT
      '$(echo "$details" | python3 -c 'import json,sys; print(json.load(sys.stdin)["app_id"])')',
      'web',
      if(number % 4 = 0, 'struct', 'page_view'),
      toString(generateUUIDv4()),
      if(number % 4 = 0, 'click', 'page_view'),
      now() - number * 60,
      now() - number * 60,
      concat('user-', toString(number % 37)),
      concat('session-', toString(number % 120)),
      arrayElement(['/', '/pricing', '/docs', '/blog'], number % 4 + 1),
      arrayElement(['Home', 'Pricing', 'Docs', 'Blog'], number % 4 + 1),
      arrayElement(['en-US', 'de-DE', 'fr-FR'], number % 3 + 1),
      arrayElement(['Linux', 'Mac OS X', 'Windows'], number % 3 + 1)
    FROM numbers($SAMPLE_EVENTS)"
fi

say "asking Cube, through the gateway, for TrackedEvents.count"
query='{"query":{"measures":["TrackedEvents.count","TrackedEvents.pageViewsCount","TrackedEvents.uniqueUsersCount"]}}'
for _ in $(seq 1 60); do
  answer=$(curl -sS -X POST "$GATEWAY/v1/product-analytics/projects/$PROJECT_ID/cubejs-api/v1/load" \
    -H "Authorization: Bearer $token" -H "X-Gitlab-Instance-Id: $instance" \
    -H 'Content-Type: application/json' -d "$query")
  [[ $answer == *'Continue wait'* ]] || break
  sleep 0.5
done
count=$(echo "$answer" | python3 -c '
import json, sys
body = json.load(sys.stdin)
if "data" not in body:
    sys.exit("unexpected answer: %s" % json.dumps(body))
row = body["data"][0]
print(row["TrackedEvents.count"])
print("page views: %s, unique users: %s" % (row["TrackedEvents.pageViewsCount"], row["TrackedEvents.uniqueUsersCount"]), file=sys.stderr)
')
echo "TrackedEvents.count = $count"

cat <<DONE

Monitor Gateway is serving in the background:
  public API     $GATEWAY   (JWKS for Cube: $GATEWAY/.well-known/jwks.json)
  admin          $ADMIN/healthz  $ADMIN/readyz  $ADMIN/metrics
  query URL      $GATEWAY/v1/product-analytics/projects/$PROJECT_ID/cubejs-api/v1
  Cube           http://127.0.0.1:14000   ClickHouse http://127.0.0.1:18123
  a token        scripts/gateway.sh token demo $instance
  logs           .stack/demo/gateway/gateway.log

Stop everything with:  scripts/stop.sh
DONE
