#!/usr/bin/env bash
# dmipro without containers: Redis, a coordinator worker, a work worker and Flower on this
# machine, each a background process with its log and pid under $DMIPRO_STACK_DIR.
#
#   deploy/local-stack.sh start     # prints the environment for clients, for `eval`
#   deploy/local-stack.sh status
#   deploy/local-stack.sh stop
#
# Job database: DMIPRO_DATABASE_URL if set (PostgreSQL for workers on several machines),
# else a SQLite file under the stack directory (allowed because every worker runs here).
# Redis listens on 127.0.0.1 and requires a password: REDIS_PASSWORD if set, else a random
# one kept in $DMIPRO_STACK_DIR/redis.password (mode 600); the printed environment carries it.
# Flower listens on 127.0.0.1:$FLOWER_PORT with its API open (FLOWER_UNAUTHENTICATED_API):
# set FLOWER_BASIC_AUTH=user:password before `start` to require a login instead.
set -euo pipefail

REPO=$(cd "$(dirname "$0")/.." && pwd)
cd "$REPO"  # workers import programs and metrics by reference, relative to the repository
STACK=${DMIPRO_STACK_DIR:-$REPO/.dmipro/stack}
PY=${PYTHON:-$REPO/.venv/bin/python}
REDIS_PORT=${REDIS_PORT:-6379}
FLOWER_PORT=${FLOWER_PORT:-5555}
WORK_SLOTS=${WORK_SLOTS:-16}

if [ -z "${REDIS_PASSWORD:-}" ]; then
  mkdir -p "$STACK"
  if [ ! -s "$STACK/redis.password" ]; then
    (umask 077; od -An -N24 -tx1 /dev/urandom | tr -d ' \n' >"$STACK/redis.password")
  fi
  REDIS_PASSWORD=$(cat "$STACK/redis.password")
fi
export REDISCLI_AUTH=$REDIS_PASSWORD  # redis-cli reads it from here, not from its command line
LOCAL_BROKER=redis://:$REDIS_PASSWORD@127.0.0.1:$REDIS_PORT/0
export DMIPRO_BROKER_URL=${DMIPRO_BROKER_URL:-$LOCAL_BROKER}
export DMIPRO_RESULT_BACKEND=${DMIPRO_RESULT_BACKEND:-redis://:$REDIS_PASSWORD@127.0.0.1:$REDIS_PORT/1}
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

launch() {  # name, command...
  local name=$1; shift
  if running "$name"; then
    echo "$name already running (pid $(cat "$(pidfile "$name")"))" >&2
    return
  fi
  nohup "$@" >"$STACK/$name.log" 2>&1 &
  echo $! >"$(pidfile "$name")"
  echo "started $name (pid $(cat "$(pidfile "$name")"), log $STACK/$name.log)" >&2
}

wait_for_log() {  # name, text
  for _ in $(seq 1 300); do
    grep -q "$2" "$STACK/$1.log" 2>/dev/null && return 0
    running "$1" || { echo "$1 exited; see $STACK/$1.log" >&2; return 1; }
    sleep 0.2
  done
  echo "$1 did not become ready; see $STACK/$1.log" >&2
  return 1
}

start() {
  mkdir -p "$STACK" "$DMIPRO_HOME"
  if [ "$DMIPRO_BROKER_URL" = "$LOCAL_BROKER" ] && ! redis-cli -p "$REDIS_PORT" ping >/dev/null 2>&1; then
    # The password goes in a config file (mode 600), not on a command line `ps` shows.
    (umask 077; printf 'requirepass "%s"\n' "$REDIS_PASSWORD" >"$STACK/redis.conf")
    launch redis redis-server "$STACK/redis.conf" --port "$REDIS_PORT" --bind 127.0.0.1 --dir "$STACK" --appendonly yes
    for _ in $(seq 1 50); do redis-cli -p "$REDIS_PORT" ping >/dev/null 2>&1 && break; sleep 0.1; done
  fi
  local celery=("$PY" -m celery -A dmipro.workers.celery_app)
  launch coordinator "${celery[@]}" worker -P threads -c 4 -Q dmipro.coordinator -n "coordinator@%h" -E --loglevel=INFO
  launch work "${celery[@]}" worker -P threads -c "$WORK_SLOTS" -Q dmipro.work -n "work@%h" -E --loglevel=INFO
  if [ -z "${FLOWER_BASIC_AUTH:-}" ]; then
    FLOWER_UNAUTHENTICATED_API=true launch flower "${celery[@]}" flower --port="$FLOWER_PORT" --address=127.0.0.1
  else
    launch flower "${celery[@]}" flower --port="$FLOWER_PORT" --address=127.0.0.1
  fi
  wait_for_log coordinator " ready."
  wait_for_log work " ready."
  echo "flower: http://127.0.0.1:$FLOWER_PORT" >&2
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

stop() {
  # Workers first (warm shutdown: running tasks finish or are redelivered), Redis last.
  for name in flower work coordinator redis; do
    if running "$name"; then
      kill -TERM "$(cat "$(pidfile "$name")")"
      for _ in $(seq 1 150); do running "$name" || break; sleep 0.2; done
      running "$name" && kill -KILL "$(cat "$(pidfile "$name")")"
      echo "stopped $name" >&2
    fi
    rm -f "$(pidfile "$name")"
  done
}

status() {
  for name in redis coordinator work flower; do
    if running "$name"; then echo "$name: running (pid $(cat "$(pidfile "$name")"))"; else echo "$name: stopped"; fi
  done
}

case "${1:-}" in
  start) start ;;
  stop) stop ;;
  status) status ;;
  env) env_lines ;;
  *) echo "usage: $0 start|stop|status|env" >&2; exit 2 ;;
esac
