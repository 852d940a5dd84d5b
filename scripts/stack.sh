#!/usr/bin/env bash
# Local ClickHouse + Cube stack for Monitor Gateway.
#
#   scripts/stack.sh install             install ClickHouse (apt) and Cube (npm ci) if missing
#   scripts/stack.sh up <profile>        install, then start both in the background and wait
#   scripts/stack.sh down <profile>      stop both (SIGTERM, then SIGKILL after a timeout)
#   scripts/stack.sh restart <profile>   down, then up
#   scripts/stack.sh status <profile>    what runs, with pids and ports
#   scripts/stack.sh clickhouse-config <dir> <http> <tcp> <interserver>
#                                        render a ClickHouse configuration into <dir> (for tests)
#   scripts/stack.sh cube-serve <config-dir> <cube-port> <clickhouse-http-port> <jwk-url>
#                                        run Cube in the foreground with cube.js and model/ of
#                                        <config-dir>, set up as the profiles' Cube (for tests)
#
# Profiles (every server binds to 127.0.0.1 only; both profiles can run side by side):
#
#   demo  ClickHouse HTTP 18123, TCP 19000, interserver 19009; Cube 14000;
#         JWKS http://127.0.0.1:8080/.well-known/jwks.json. State is kept between runs.
#   test  ClickHouse HTTP 28123, TCP 29000, interserver 29009; Cube 24000;
#         JWKS http://127.0.0.1:28080/.well-known/jwks.json. `up test` wipes .stack/test first
#         (after stopping what runs there), unless the whole test stack is already running.
#
# Overrides (read by `up`; `status` and `down` use what `up` recorded): CLICKHOUSE_HTTP_PORT,
# CLICKHOUSE_TCP_PORT, CLICKHOUSE_INTERSERVER_PORT, CUBE_PORT, CUBE_JWK_URL, CUBE_LOG_LEVEL
# (error, warn, info or trace; default warn), STACK_WAIT_SECONDS (readiness timeout, default 60),
# STACK_STOP_SECONDS (SIGTERM grace period before SIGKILL, default 20), STACK_ROOT (where this
# script keeps the profiles' state, default .stack at the repository root). Other CUBEJS_* variables
# of the caller are not passed to Cube.
#
# All state (data, tmp, logs, pid files, generated configs) lives in $STACK_ROOT/<profile>/:
# clickhouse/{config.xml,users.xml,data,tmp,log,...}, cube/{cube.log,cube.pid}, ports.env.

set -euo pipefail

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
readonly REPO_ROOT
readonly STACK_ROOT="${STACK_ROOT:-$REPO_ROOT/.stack}"
readonly CUBE_DIR="$REPO_ROOT/config/cube"
readonly CH_TEMPLATE_DIR="$REPO_ROOT/config/clickhouse"
readonly CH_SERVER_BIN="/usr/sbin/clickhouse-server"
readonly CH_CLIENT_BIN="/usr/bin/clickhouse-client"
readonly NPM_STAMP="$CUBE_DIR/node_modules/.monitor-gateway-lock.sha256"
readonly WAIT_SECONDS="${STACK_WAIT_SECONDS:-60}"
readonly STOP_SECONDS="${STACK_STOP_SECONDS:-20}"

log() { printf 'stack: %s\n' "$*" >&2; }
die() { printf 'stack: error: %s\n' "$*" >&2; exit 1; }

usage() {
  sed -n '2,/^$/{s/^# \{0,1\}//;p}' "${BASH_SOURCE[0]}" >&2
  exit 2
}

# Runs a command as root, through sudo when we are not root.
as_root() {
  if [[ $EUID -eq 0 ]]; then
    "$@"
  elif command -v sudo >/dev/null 2>&1; then
    sudo "$@"
  else
    die "need root (or sudo) to run: $*"
  fi
}

# ---------------------------------------------------------------------------------------------
# install

install_clickhouse() {
  if [[ -x $CH_SERVER_BIN && -x $CH_CLIENT_BIN ]]; then
    return 0
  fi
  command -v apt-get >/dev/null 2>&1 \
    || die "clickhouse-server is missing and apt-get is not available; install ClickHouse 18.16+"
  log "installing clickhouse-server and clickhouse-client (apt-get)"
  mkdir -p "$STACK_ROOT"
  local apt_log="$STACK_ROOT/apt-install.log"
  if ! {
    as_root apt-get update -qq \
      && as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
        --no-install-recommends clickhouse-server clickhouse-client
  } >"$apt_log" 2>&1; then
    tail -n 30 "$apt_log" >&2
    die "apt-get failed (full output in $apt_log)"
  fi
  [[ -x $CH_SERVER_BIN ]] || die "apt-get finished but $CH_SERVER_BIN is missing"
}

# Hash of the npm inputs; node_modules is reinstalled when it changes.
cube_lock_hash() {
  cat "$CUBE_DIR/package.json" "$CUBE_DIR/package-lock.json" | sha256sum | cut -d' ' -f1
}

install_cube() {
  command -v node >/dev/null 2>&1 || die "node (20 recommended) is required for Cube"
  command -v npm >/dev/null 2>&1 || die "npm is required for Cube"
  [[ -f $CUBE_DIR/package-lock.json ]] || die "missing $CUBE_DIR/package-lock.json"

  local want
  want="$(cube_lock_hash)"
  if [[ -f $NPM_STAMP && "$(cat "$NPM_STAMP")" == "$want" ]]; then
    return 0
  fi

  log "installing Cube (npm ci in config/cube)"
  (
    cd "$CUBE_DIR"
    # Cube Store's post-install downloads a binary from outside the registries; we never use it.
    CUBESTORE_SKIP_POST_INSTALL=true npm ci --no-audit --no-fund --loglevel=error
  )
  printf '%s\n' "$want" >"$NPM_STAMP"
}

cmd_install() {
  install_clickhouse
  install_cube
}

# ---------------------------------------------------------------------------------------------
# profiles and state

# Sets the profile's ports and paths as globals: PROFILE, STATE_DIR, CH_DIR, CUBE_STATE_DIR,
# CH_HTTP_PORT, CH_TCP_PORT, CH_INTERSERVER_PORT, CUBE_HTTP_PORT, JWK_URL.
select_profile() {
  PROFILE="${1:-}"
  local http tcp interserver cube jwk
  case "$PROFILE" in
    demo) http=18123 tcp=19000 interserver=19009 cube=14000
          jwk="http://127.0.0.1:8080/.well-known/jwks.json" ;;
    test) http=28123 tcp=29000 interserver=29009 cube=24000
          jwk="http://127.0.0.1:28080/.well-known/jwks.json" ;;
    "") usage ;;
    *) die "unknown profile '$PROFILE' (expected demo or test)" ;;
  esac
  CH_HTTP_PORT="${CLICKHOUSE_HTTP_PORT:-$http}"
  CH_TCP_PORT="${CLICKHOUSE_TCP_PORT:-$tcp}"
  CH_INTERSERVER_PORT="${CLICKHOUSE_INTERSERVER_PORT:-$interserver}"
  CUBE_HTTP_PORT="${CUBE_PORT:-$cube}"
  JWK_URL="${CUBE_JWK_URL:-$jwk}"
  local port
  for port in "$CH_HTTP_PORT" "$CH_TCP_PORT" "$CH_INTERSERVER_PORT" "$CUBE_HTTP_PORT"; do
    if ! [[ $port =~ ^[1-9][0-9]{0,4}$ ]] || ((port > 65535)); then
      die "invalid port '$port'"
    fi
  done

  STATE_DIR="$STACK_ROOT/$PROFILE"
  CH_DIR="$STATE_DIR/clickhouse"
  CUBE_STATE_DIR="$STATE_DIR/cube"
}

# Replaces the ports with those recorded by the last `up`, so status/down describe what runs.
load_recorded_ports() {
  local file="$STATE_DIR/ports.env" key value
  [[ -f $file ]] || return 0
  while IFS='=' read -r key value; do
    case "$key" in
      CLICKHOUSE_HTTP_PORT) CH_HTTP_PORT="$value" ;;
      CLICKHOUSE_TCP_PORT) CH_TCP_PORT="$value" ;;
      CLICKHOUSE_INTERSERVER_PORT) CH_INTERSERVER_PORT="$value" ;;
      CUBE_PORT) CUBE_HTTP_PORT="$value" ;;
      CUBE_JWK_URL) JWK_URL="$value" ;;
    esac
  done <"$file"
}

record_ports() {
  cat >"$STATE_DIR/ports.env" <<EOF
CLICKHOUSE_HTTP_PORT=$CH_HTTP_PORT
CLICKHOUSE_TCP_PORT=$CH_TCP_PORT
CLICKHOUSE_INTERSERVER_PORT=$CH_INTERSERVER_PORT
CUBE_PORT=$CUBE_HTTP_PORT
CUBE_JWK_URL=$JWK_URL
EOF
}

# One `up`/`down` at a time per profile (tests may start the stack from several processes).
lock_profile() {
  mkdir -p "$STACK_ROOT"
  command -v flock >/dev/null 2>&1 || return 0
  exec 9>"$STACK_ROOT/$PROFILE.lock"
  flock -w 300 9 || die "timed out waiting for another stack.sh on profile $PROFILE"
}

# ---------------------------------------------------------------------------------------------
# processes

# Prints the pid recorded in $1 if that process is alive and its command line contains $2.
# A stale pid file (dead process, or a reused pid) is removed.
live_pid() {
  local pid_file=$1 marker=$2 pid
  [[ -f $pid_file ]] || return 1
  pid="$(cat "$pid_file" 2>/dev/null || true)"
  if [[ $pid =~ ^[0-9]+$ ]] && kill -0 "$pid" 2>/dev/null \
    && { tr '\0' ' ' <"/proc/$pid/cmdline"; } 2>/dev/null | grep -F -- "$marker" >/dev/null; then
    printf '%s\n' "$pid"
    return 0
  fi
  rm -f "$pid_file"
  return 1
}

# Pids of processes started for this profile whose pid file is gone (for example after the state
# folder was deleted by hand): every process we start carries STACK_STATE_DIR in its environment.
orphan_pids() {
  local environ pid
  for environ in /proc/[0-9]*/environ; do
    pid="${environ#/proc/}"
    pid="${pid%/environ}"
    if { tr '\0' '\n' <"$environ"; } 2>/dev/null | grep -xF -- "STACK_STATE_DIR=$STATE_DIR" >/dev/null; then
      printf '%s\n' "$pid"
    fi
  done
}

# Stops the given "pid:name" processes together: SIGTERM to all, wait up to STOP_SECONDS, then
# SIGKILL for what is left.
stop_all() {
  local entry pid name waited=0 alive
  for entry in "$@"; do
    kill -TERM "${entry%%:*}" 2>/dev/null || true
  done
  while :; do
    alive=()
    for entry in "$@"; do
      if kill -0 "${entry%%:*}" 2>/dev/null; then alive+=("$entry"); fi
    done
    ((${#alive[@]} > 0)) || break
    if ((waited >= STOP_SECONDS * 10)); then
      for entry in "${alive[@]}"; do
        log "${entry#*:} (pid ${entry%%:*}) still running after ${STOP_SECONDS}s; sending SIGKILL"
        kill -KILL "${entry%%:*}" 2>/dev/null || true
      done
      break
    fi
    sleep 0.1
    waited=$((waited + 1))
  done
  for entry in "$@"; do
    pid="${entry%%:*}" name="${entry#*:}"
    log "stopped $name (pid $pid)"
  done
  log "stopped in $((waited / 10)).$((waited % 10))s"
}

# Succeeds when something accepts TCP connections on 127.0.0.1:$1.
port_open() {
  (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null
}

# Prints the HTTP status code of GET http://127.0.0.1:$1$2 (no curl needed).
http_status() {
  local port=$1 path=$2
  (
    exec 3<>"/dev/tcp/127.0.0.1/$port" || exit 1
    printf 'GET %s HTTP/1.0\r\nHost: 127.0.0.1:%s\r\nConnection: close\r\n\r\n' \
      "$path" "$port" >&3
    IFS=' ' read -r -t 5 _ status _ <&3 || exit 1
    printf '%s\n' "$status"
  ) 2>/dev/null
}

# Waits until GET $3 on port $2 answers 200 while pid $4 lives; on failure shows log $5.
wait_http() {
  local name=$1 port=$2 path=$3 pid=$4 log_file=$5 deadline=$((SECONDS + WAIT_SECONDS))
  while ((SECONDS < deadline)); do
    if ! kill -0 "$pid" 2>/dev/null; then
      log "$name (pid $pid) exited during start-up; last lines of $log_file:"
      tail -n 40 "$log_file" >&2 || true
      return 1
    fi
    if [[ "$(http_status "$port" "$path" || true)" == 200 ]]; then
      return 0
    fi
    sleep 0.1
  done
  log "$name not ready on 127.0.0.1:$port$path after ${WAIT_SECONDS}s; last lines of $log_file:"
  tail -n 40 "$log_file" >&2 || true
  return 1
}

ensure_port_free() {
  local name=$1 port=$2
  if port_open "$port"; then
    die "port $port ($name) is already in use by another process; stop it or override the port"
  fi
}

# ---------------------------------------------------------------------------------------------
# ClickHouse

sed_escape() {
  printf '%s' "$1" | sed -e 's/[\\&|]/\\&/g'
}

render_clickhouse_config() {
  local dir file
  dir="$(sed_escape "$CH_DIR")"
  mkdir -p "$CH_DIR"/{data,tmp,log,user_files,format_schemas}
  for file in config.xml users.xml; do
    sed -e "s|@@CH_DIR@@|$dir|g" \
        -e "s|@@HTTP_PORT@@|$CH_HTTP_PORT|g" \
        -e "s|@@TCP_PORT@@|$CH_TCP_PORT|g" \
        -e "s|@@INTERSERVER_PORT@@|$CH_INTERSERVER_PORT|g" \
        "$CH_TEMPLATE_DIR/$file" >"$CH_DIR/$file"
  done
}

clickhouse_pid() {
  live_pid "$CH_DIR/clickhouse.pid" "$CH_DIR/config.xml"
}

start_clickhouse() {
  local pid
  if pid="$(clickhouse_pid)"; then
    log "clickhouse already running (pid $pid)"
    return 0
  fi
  ensure_port_free "clickhouse http" "$CH_HTTP_PORT"
  ensure_port_free "clickhouse tcp" "$CH_TCP_PORT"
  ensure_port_free "clickhouse interserver" "$CH_INTERSERVER_PORT"
  render_clickhouse_config

  # setsid: a new session, so a Ctrl-C or a closing terminal of the caller does not reach it.
  (
    exec 9>&- # the profile lock must not outlive this script
    cd "$CH_DIR"
    export STACK_STATE_DIR="$STATE_DIR" TZ=UTC
    exec setsid "$CH_SERVER_BIN" --config-file="$CH_DIR/config.xml" \
      </dev/null >>"$CH_DIR/log/stdout.log" 2>&1
  ) &
  pid=$!
  printf '%s\n' "$pid" >"$CH_DIR/clickhouse.pid"

  if ! wait_http clickhouse "$CH_HTTP_PORT" "/?query=SELECT%201" "$pid" \
    "$CH_DIR/log/clickhouse-server.err.log"; then
    tail -n 20 "$CH_DIR/log/stdout.log" >&2 || true
    die "clickhouse failed to start (logs in $CH_DIR/log)"
  fi
  log "clickhouse ready: http 127.0.0.1:$CH_HTTP_PORT, tcp 127.0.0.1:$CH_TCP_PORT (pid $pid)"
}

# ---------------------------------------------------------------------------------------------
# Cube

# Replaces this shell with Cube serving cube.js and model/ of folder $1 on CUBE_HTTP_PORT, against
# ClickHouse on CH_HTTP_PORT, trusting JWK_URL; the rest of the arguments (such as setsid) run it.
exec_cube() {
  local dir=$1
  shift
  cd "$dir"
  # Start from no CUBEJS_* at all: an inherited CUBEJS_DB_NAME, for one, would override the
  # per-tenant database (cube.js refuses to start with it set).
  while IFS= read -r name; do unset "$name"; done < <(compgen -e | grep -E '^CUBEJS_' || true)
  export TZ=UTC NODE_ENV=production \
    CUBE_LISTEN_HOST=127.0.0.1 \
    PORT="$CUBE_HTTP_PORT" \
    CUBEJS_DB_TYPE=clickhouse \
    CUBEJS_DB_HOST=127.0.0.1 \
    CUBEJS_DB_PORT="$CH_HTTP_PORT" \
    CUBEJS_DB_USER=cube \
    CUBEJS_DB_PASS= \
    CUBEJS_DB_CLICKHOUSE_READONLY=true \
    CUBEJS_DEV_MODE=false \
    CUBEJS_CACHE_AND_QUEUE_DRIVER=memory \
    CUBEJS_EXTERNAL_DEFAULT=false \
    CUBEJS_SCHEDULED_REFRESH_DEFAULT=false \
    CUBEJS_TELEMETRY=false \
    CUBEJS_SCHEMA_PATH=model \
    CUBEJS_JWK_URL="$JWK_URL" \
    CUBEJS_JWT_AUDIENCE=cube \
    CUBEJS_JWT_ISSUER=monitor-gateway \
    CUBEJS_JWT_ALGS=RS256 \
    CUBEJS_GRACEFUL_SHUTDOWN=5 \
    CUBEJS_LOG_LEVEL="${CUBE_LOG_LEVEL:-warn}"
  # listen-host.js makes Cube bind CUBE_LISTEN_HOST only (Cube itself binds every interface).
  exec "$@" node --require "$CUBE_DIR/listen-host.js" "$CUBE_DIR/node_modules/.bin/cubejs-server"
}

cube_pid() {
  live_pid "$CUBE_STATE_DIR/cube.pid" "cubejs-server"
}

start_cube() {
  local pid
  if pid="$(cube_pid)"; then
    log "cube already running (pid $pid)"
    return 0
  fi
  ensure_port_free cube "$CUBE_HTTP_PORT"
  mkdir -p "$CUBE_STATE_DIR"

  (
    exec 9>&- # the profile lock must not outlive this script
    export STACK_STATE_DIR="$STATE_DIR"
    exec_cube "$CUBE_DIR" setsid </dev/null >>"$CUBE_STATE_DIR/cube.log" 2>&1
  ) &
  pid=$!
  printf '%s\n' "$pid" >"$CUBE_STATE_DIR/cube.pid"

  # /livez checks the ClickHouse connections of the tenants seen so far (none yet), /readyz
  # checks nothing once contextToAppId is configured; either answers 200 when the API is up.
  if ! wait_http cube "$CUBE_HTTP_PORT" /livez "$pid" "$CUBE_STATE_DIR/cube.log"; then
    die "cube failed to start (log: $CUBE_STATE_DIR/cube.log)"
  fi
  log "cube ready: http 127.0.0.1:$CUBE_HTTP_PORT, jwks $JWK_URL (pid $pid)"
}

# ---------------------------------------------------------------------------------------------
# commands

# Stops Cube, ClickHouse and any orphan of the profile (both servers at once: Cube only queries
# ClickHouse on request, so the order does not matter and stopping together halves the wait).
stop_profile() {
  local pid known targets=()
  if pid="$(cube_pid)"; then targets+=("$pid:cube"); fi
  if pid="$(clickhouse_pid)"; then targets+=("$pid:clickhouse"); fi
  known=" ${targets[*]%%:*} "
  for pid in $(orphan_pids); do
    [[ $known == *" $pid "* ]] || targets+=("$pid:orphaned process of profile $PROFILE")
  done

  if ((${#targets[@]} > 0)); then
    stop_all "${targets[@]}"
  fi
  rm -f "$CUBE_STATE_DIR/cube.pid" "$CH_DIR/clickhouse.pid"
}

cmd_up() {
  select_profile "$@"
  lock_profile
  cmd_install

  if clickhouse_pid >/dev/null && cube_pid >/dev/null; then
    load_recorded_ports
    log "profile $PROFILE is already running; nothing to do"
    print_status
    return 0
  fi

  if [[ $PROFILE == test ]]; then
    stop_profile
    rm -rf "$STATE_DIR"
  fi
  mkdir -p "$STATE_DIR"
  record_ports

  start_clickhouse
  start_cube
  print_status
}

cmd_down() {
  select_profile "$@"
  lock_profile
  stop_profile
  log "profile $PROFILE is down"
}

cmd_restart() {
  cmd_down "$@"
  cmd_up "$@"
}

print_status() {
  local pid
  printf 'profile:    %s (state in %s)\n' "$PROFILE" "$STATE_DIR"
  if pid="$(clickhouse_pid)"; then
    printf 'clickhouse: running, pid %s, http 127.0.0.1:%s (SELECT 1 -> %s), tcp 127.0.0.1:%s\n' \
      "$pid" "$CH_HTTP_PORT" "$(http_status "$CH_HTTP_PORT" "/?query=SELECT%201" || echo down)" \
      "$CH_TCP_PORT"
  else
    printf 'clickhouse: stopped (http %s, tcp %s)\n' "$CH_HTTP_PORT" "$CH_TCP_PORT"
  fi
  if pid="$(cube_pid)"; then
    printf 'cube:       running, pid %s, http 127.0.0.1:%s (/livez -> %s), jwks %s\n' \
      "$pid" "$CUBE_HTTP_PORT" "$(http_status "$CUBE_HTTP_PORT" /livez || echo down)" "$JWK_URL"
  else
    printf 'cube:       stopped (http %s)\n' "$CUBE_HTTP_PORT"
  fi
  local orphans
  orphans="$(orphan_pids | grep -vxF -e "$(clickhouse_pid || true)" -e "$(cube_pid || true)" || true)"
  if [[ -n $orphans ]]; then
    printf 'orphans:    pids %s carry this profile but have no pid file (down stops them)\n' \
      "$(printf '%s' "$orphans" | tr '\n' ' ')"
  fi
}

cmd_status() {
  select_profile "$@"
  load_recorded_ports
  print_status
}

# Renders the ClickHouse configuration into a folder of the caller's, for tests that run a
# private server of their own (to stop and restart it) beside the profile's.
cmd_clickhouse_config() {
  [[ $# -eq 4 ]] || die "usage: stack.sh clickhouse-config <dir> <http-port> <tcp-port> <interserver-port>"
  CH_DIR=$1 CH_HTTP_PORT=$2 CH_TCP_PORT=$3 CH_INTERSERVER_PORT=$4
  render_clickhouse_config
}

# Runs Cube in the foreground, configured as the profiles' Cube, for tests that run a private one
# of their own (to stop and start it, or with a configuration of their own).
cmd_cube_serve() {
  [[ $# -eq 4 ]] || die "usage: stack.sh cube-serve <config-dir> <cube-port> <clickhouse-http-port> <jwk-url>"
  CUBE_HTTP_PORT=$2 CH_HTTP_PORT=$3 JWK_URL=$4
  exec_cube "$1"
}

main() {
  local command="${1:-}"
  shift || true
  case "$command" in
    install) cmd_install ;;
    up) cmd_up "$@" ;;
    down) cmd_down "$@" ;;
    restart) cmd_restart "$@" ;;
    status) cmd_status "$@" ;;
    clickhouse-config) cmd_clickhouse_config "$@" ;;
    cube-serve) cmd_cube_serve "$@" ;;
    *) usage ;;
  esac
}

main "$@"
