#!/usr/bin/env bash
# Start the local Postgres and Redis the integration tests talk to, if they are down.
# Idempotent; on a machine without them installed it says so and leaves the decision to the tests.
set -euo pipefail

pg_up() { pg_isready -h 127.0.0.1 -p 5432 -q 2>/dev/null; }
redis_up() { redis-cli -h 127.0.0.1 -p 6379 ping 2>/dev/null | grep -q PONG; }

if command -v pg_isready >/dev/null && ! pg_up; then
  echo "services: starting PostgreSQL"
  pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql | head -n1)" main start
  for _ in $(seq 50); do pg_up && break; sleep 0.2; done
fi
if command -v redis-server >/dev/null && ! redis_up; then
  echo "services: starting Redis"
  mkdir -p /var/lib/redis /var/log/redis
  redis-server --daemonize yes --bind 127.0.0.1 -::1 --port 6379 --save "" --appendonly no \
    --dir /var/lib/redis --logfile /var/log/redis/ci.log
  for _ in $(seq 50); do redis_up && break; sleep 0.2; done
fi
pg_up && echo "services: PostgreSQL up" || echo "services: PostgreSQL not available"
redis_up && echo "services: Redis up" || echo "services: Redis not available"
