#!/usr/bin/env bash
# dmipro without containers: Redis, a coordinator worker, work workers and Flower on this
# machine, each a background process with its log and pid under $DMIPRO_STACK_DIR.
#
#   eval "$(deploy/local-stack.sh up)"   # starts everything, prints the clients' environment
#   dmipro submit examples/math_qa/job.yaml --executor celery
#   deploy/local-stack.sh status         # one line per process; exit 3 if any is not running
#   deploy/local-stack.sh env            # the clients' environment again
#   deploy/local-stack.sh down           # stops everything, Redis last
#
# (`start` and `stop` are the same as `up` and `down`.)
#
# Settings (environment):
#   DMIPRO_STACK_DIR   pids, logs, Redis data and password   (default .dmipro/stack)
#   DMIPRO_HOME        programs and the SQLite job database   (default .dmipro)
#   DMIPRO_DATABASE_URL  the job database. Unset: a SQLite file under DMIPRO_HOME, allowed for
#                      workers (DMIPRO_ALLOW_SQLITE_REMOTE=1) because they all run here. Set it to
#                      a PostgreSQL URL (postgresql+psycopg://...) to use PostgreSQL instead.
#   REDIS_PORT         (default 6379). Redis listens on 127.0.0.1 and requires a password:
#                      REDIS_PASSWORD if set, else a random one kept in $DMIPRO_STACK_DIR/redis.password
#                      (mode 600); the printed environment carries it. With DMIPRO_BROKER_URL set,
#                      no Redis is started and that broker is used.
#   WORK_WORKERS       work worker processes (default 2), WORK_SLOTS threads each (default 8)
#   COORDINATOR_SLOTS  jobs the coordinator runs at once (default 4)
#   FLOWER             1 (default) or 0. Flower listens on 127.0.0.1:$FLOWER_PORT (default 5555)
#                      with its API open (FLOWER_UNAUTHENTICATED_API); set FLOWER_BASIC_AUTH=user:pw
#                      before `up` to require a login instead.
#   PYTHON             the interpreter with dmipro installed (default .venv/bin/python)
set -euo pipefail

REPO=$(cd "$(dirname "$0")/.." && pwd)
cd "$REPO"  # workers import programs and metrics by reference, relative to the repository
STACK=${DMIPRO_STACK_DIR:-$REPO/.dmipro/stack}
PY=${PYTHON:-$REPO/.venv/bin/python}
REDIS_PORT=${REDIS_PORT:-6379}
FLOWER_PORT=${FLOWER_PORT:-5555}
FLOWER=${FLOWER:-1}
WORK_WORKERS=${WORK_WORKERS:-2}
WORK_SLOTS=${WORK_SLOTS:-8}
COORDINATOR_SLOTS=${COORDINATOR_SLOTS:-4}
STOP_TIMEOUT_S=${STOP_TIMEOUT_S:-60}

mkdir -p "$STACK"
if [ -z "${REDIS_PASSWORD:-}" ]; then
  if [ ! -s "$STACK/redis.password" ]; then
    (umask 077; od -An -N24 -tx1 /dev/urandom | tr -d ' \n' >"$STACK/redis.password")
  fi
  REDIS_PASSWORD=$(cat "$STACK/redis.password")
fi
export REDISCLI_AUTH=$REDIS_PASSWORD  # redis-cli reads it from here, not from its command line
OWN_REDIS=0
if [ -z "${DMIPRO_BROKER_URL:-}" ]; then
  OWN_REDIS=1
  export DMIPRO_BROKER_URL=redis://:$REDIS_PASSWORD@127.0.0.1:$REDIS_PORT/0
  export DMIPRO_RESULT_BACKEND=${DMIPRO_RESULT_BACKEND:-redis://:$REDIS_PASSWORD@127.0.0.1:$REDIS_PORT/1}
fi
export DMIPRO_RESULT_BACKEND=${DMIPRO_RESULT_BACKEND:-$DMIPRO_BROKER_URL}
export DMIPRO_HOME=${DMIPRO_HOME:-$REPO/.dmipro}
if [ -z "${DMIPRO_DATABASE_URL:-}" ]; then
  export DMIPRO_DATABASE_URL="sqlite:///$DMIPRO_HOME/dmipro.db"
  export DMIPRO_ALLOW_SQLITE_REMOTE=1
fi

pidfile() { echo "$STACK/$1.pid"; }

running() {
  local pid
  [ -f "$(pidfile "$1")" ] && pid=$(cat "$(pidfile "$1")") && kill -0 "$pid" 2>/dev/null
}

work_names() { for i in $(seq 1 "$WORK_WORKERS"); do echo "work-$i"; done; }

# Every process this stack may have started, in start order (stopped in reverse). Work
# workers from an earlier `up` with a larger WORK_WORKERS are found by their pid files.
names() {
  printf '%s\n' redis coordinator
  { work_names; ls "$STACK" 2>/dev/null | sed -n 's/^\(work-[0-9]*\)\.pid$/\1/p'; } | sort -u -t- -k2,2n
  echo flower
}

launch() {  # name, command...
  local name=$1; shift
  if running "$name"; then
    echo "$name already running (pid $(cat "$(pidfile "$name")"))" >&2
    return
  fi
  nohup "$@" >"$STACK/$name.log" 2>&1 &
  echo $! >"$(pidfile "$name")"
  echo "started $name (pid $!, log $STACK/$name.log)" >&2
}

wait_until() {  # name, what, command...: poll the command for up to 60 s while the process lives
  local name=$1 what=$2; shift 2
  for _ in $(seq 1 300); do
    "$@" >/dev/null 2>&1 && return 0
    running "$name" || { echo "$name exited; see $STACK/$name.log" >&2; return 1; }
    sleep 0.2
  done
  echo "$name did not $what within 60 s; see $STACK/$name.log" >&2
  return 1
}

redis_answers() { [ "$(redis-cli -p "$REDIS_PORT" ping 2>/dev/null)" = PONG ]; }
port_taken() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

up() {
  mkdir -p "$DMIPRO_HOME"
  if [ "$OWN_REDIS" = 1 ] && ! running redis; then
    if port_taken "$REDIS_PORT"; then
      echo "port $REDIS_PORT is taken by another process: set REDIS_PORT" >&2
      return 1
    fi
    # The password goes in a config file (mode 600), not on a command line `ps` shows.
    (umask 077; printf 'requirepass "%s"\n' "$REDIS_PASSWORD" >"$STACK/redis.conf")
    launch redis redis-server "$STACK/redis.conf" --port "$REDIS_PORT" --bind 127.0.0.1 --dir "$STACK" \
      --appendonly yes
    wait_until redis "answer PING" redis_answers
  fi
  local celery=("$PY" -m celery -A dmipro.workers.celery_app)
  launch coordinator "${celery[@]}" worker -P threads -c "$COORDINATOR_SLOTS" -Q dmipro.coordinator \
    -n "coordinator@%h" -E --loglevel=INFO
  for name in $(work_names); do
    launch "$name" "${celery[@]}" worker -P threads -c "$WORK_SLOTS" -Q dmipro.work -n "$name@%h" -E \
      --loglevel=INFO
  done
  if [ "$FLOWER" = 1 ]; then
    if [ -z "${FLOWER_BASIC_AUTH:-}" ]; then
      FLOWER_UNAUTHENTICATED_API=true launch flower "${celery[@]}" flower --port="$FLOWER_PORT" \
        --address=127.0.0.1
    else
      launch flower "${celery[@]}" flower --port="$FLOWER_PORT" --address=127.0.0.1
    fi
  fi
  for name in coordinator $(work_names); do
    wait_until "$name" "become ready" grep -q " ready." "$STACK/$name.log"
  done
  if [ "$FLOWER" = 1 ]; then
    wait_until flower "listen on $FLOWER_PORT" port_taken "$FLOWER_PORT"
    echo "flower: http://127.0.0.1:$FLOWER_PORT" >&2
  fi
  env_lines
}

env_lines() {
  echo "export DMIPRO_BROKER_URL=$DMIPRO_BROKER_URL"
  echo "export DMIPRO_RESULT_BACKEND=$DMIPRO_RESULT_BACKEND"
  echo "export DMIPRO_HOME=$DMIPRO_HOME"
  echo "export DMIPRO_DATABASE_URL=$DMIPRO_DATABASE_URL"
  [ -n "${DMIPRO_ALLOW_SQLITE_REMOTE:-}" ] && echo "export DMIPRO_ALLOW_SQLITE_REMOTE=1"
  return 0
}

stop_all() {  # names...: SIGTERM to all at once, wait for each, SIGKILL past STOP_TIMEOUT_S
  local name stuck=0
  for name in "$@"; do running "$name" && kill -TERM "$(cat "$(pidfile "$name")")"; done
  for _ in $(seq 1 $((STOP_TIMEOUT_S * 5))); do
    local alive=0
    for name in "$@"; do running "$name" && alive=1; done
    [ $alive = 0 ] && break
    sleep 0.2
  done
  for name in "$@"; do
    if running "$name"; then
      echo "$name did not stop within ${STOP_TIMEOUT_S} s: SIGKILL" >&2
      kill -KILL "$(cat "$(pidfile "$name")")" 2>/dev/null || true
      sleep 0.2
      running "$name" && { echo "$name (pid $(cat "$(pidfile "$name")")) is still running" >&2; stuck=1; }
    fi
    if [ -f "$(pidfile "$name")" ] && ! running "$name"; then
      rm -f "$(pidfile "$name")"
      echo "stopped $name" >&2
    fi
  done
  return $stuck
}

down() {
  # Flower and the workers first, together (warm shutdown: running tasks finish, or go back
  # to the queue and resume at the next `up`), Redis last: they need it to hand tasks back.
  local rc=0
  # shellcheck disable=SC2046  # names are single words
  stop_all $(names | grep -v '^redis$') || rc=1
  stop_all redis || rc=1
  return $rc
}

status() {
  local all=0
  for name in $(names); do
    [ "$name" = redis ] && [ "$OWN_REDIS" = 0 ] && continue
    [ "$name" = flower ] && [ "$FLOWER" = 0 ] && ! running flower && continue
    if running "$name"; then
      echo "$name: running (pid $(cat "$(pidfile "$name")"))"
    else
      echo "$name: stopped"
      all=3
    fi
  done
  return $all
}

case "${1:-}" in
  up | start) up ;;
  down | stop) down ;;
  status) status ;;
  env) env_lines ;;
  *) echo "usage: $0 up|down|status|env" >&2; exit 2 ;;
esac
