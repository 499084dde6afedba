#!/usr/bin/env bash
# Sets up everything the test suite needs on this machine and runs it.
# Usage: bash tests/run.sh [pytest arguments]
set -euo pipefail
cd "$(dirname "$0")/.."

python3 -m venv .venv
.venv/bin/pip install --quiet --disable-pip-version-check --only-binary=:all: -r requirements.txt

# Debian packages the suite uses: Chromium for the browser tests, PostgreSQL
# and Redis for the production configuration, promtool (prometheus). Installed only when missing.
missing=()
[ -x /usr/bin/chromium ] || missing+=(chromium)
command -v pg_ctlcluster >/dev/null || missing+=(postgresql)
command -v redis-server >/dev/null || missing+=(redis-server)
# promtool, which checks the /metrics exposition (tests/monitoring/test_metrics.py).
command -v promtool >/dev/null || missing+=(prometheus)
if [ ${#missing[@]} -gt 0 ]; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}"
fi

if ! pg_isready -q -h 127.0.0.1 -p 5432; then
    pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql)" main start
fi
if ! redis-cli -h 127.0.0.1 -p 6379 ping >/dev/null 2>&1; then
    redis-server --daemonize yes --bind 127.0.0.1 --port 6379 --save "" --appendonly no
fi
for _ in $(seq 50); do
    pg_isready -q -h 127.0.0.1 -p 5432 && redis-cli -h 127.0.0.1 -p 6379 ping >/dev/null 2>&1 && break
    sleep 0.2
done
# A freshly installed PostgreSQL only lets the postgres OS user in; give root a role.
if ! psql -h 127.0.0.1 -U postgres -d postgres -c 'select 1' >/dev/null 2>&1; then
    su postgres -c "psql -qc \"ALTER ROLE postgres PASSWORD 'postgres'\""
    export PGPASSWORD=postgres
fi

# The suite runs on Postgres and Redis; tests that need the embedded default
# (SQLite, in-memory layer) start their own servers without these.
export DATABASE_URL="${TEST_DATABASE_URL:-postgres://postgres@127.0.0.1:5432/voicebot}"
export REDIS_URL="${TEST_REDIS_URL:-redis://127.0.0.1:6379/9}"
# Pub/sub channels ignore the database number; the prefix keeps tests apart.
export CHANNEL_LAYER_PREFIX=voicebot-test
export DJANGO_SECRET_KEY="${DJANGO_SECRET_KEY:-test-only-secret-key}"
export VOICEBOT_DATA_DIR="${VOICEBOT_DATA_DIR:-$(mktemp -d)}"

exec .venv/bin/python -m pytest "$@"
