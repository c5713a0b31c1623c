#!/usr/bin/env bash
# Start whichever local service the tests need and is not answering, and apply
# the settings the tests rely on. Safe to run when everything is already up.
# Commands: ../shared/SERVICES.md.
set -uo pipefail

up() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
wait_up() { for _ in $(seq 1 60); do up "$1" && return 0; sleep 0.5; done; return 1; }

if ! up 5432; then
  echo "starting PostgreSQL"
  pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql | head -n 1)" main start || true
  wait_up 5432 || echo "WARNING: PostgreSQL did not come up"
fi
# PostgreSQL logical replication (the CDC source's tests): wal_level=logical
# needs a restart, done only when the setting is not there yet.
pg_sql() { psql -h 127.0.0.1 -U postgres -d postgres -XAtqc "$1" 2>/dev/null; }
if up 5432 && [ "$(pg_sql 'SHOW wal_level')" != "logical" ]; then
  echo "PostgreSQL: setting wal_level=logical and restarting"
  pg_sql "ALTER SYSTEM SET wal_level = logical" >/dev/null
  [ "$(pg_sql 'SHOW max_replication_slots')" -ge 10 ] 2>/dev/null \
    || pg_sql "ALTER SYSTEM SET max_replication_slots = 10" >/dev/null
  [ "$(pg_sql 'SHOW max_wal_senders')" -ge 10 ] 2>/dev/null \
    || pg_sql "ALTER SYSTEM SET max_wal_senders = 10" >/dev/null
  pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql | head -n 1)" main restart || true
  for _ in $(seq 1 60); do pg_sql 'SELECT 1' >/dev/null && break; sleep 0.5; done
  [ "$(pg_sql 'SHOW wal_level')" = "logical" ] || echo "WARNING: PostgreSQL wal_level is not logical"
fi
if ! up 3306; then
  echo "starting MariaDB"
  start-stop-daemon --start --oknodo --background --exec /usr/sbin/mariadbd || true
  wait_up 3306 || echo "WARNING: MariaDB did not come up"
fi
# MariaDB binlog (the mysql_cdc source's tests): log_bin, binlog_format=ROW,
# a server_id, full row images. log_bin needs a restart, done only when it is
# off; the settings go to a file my.cnf includes, so a restart by the
# command in SERVICES.md keeps them.
my_sql() { mysql -h 127.0.0.1 -P 3306 -uroot -NBe "$1" 2>/dev/null; }
if up 3306 && [ "$(my_sql 'SELECT @@log_bin')" = "0" ]; then
  echo "MariaDB: enabling the binlog (ROW) and restarting"
  mkdir -p /etc/mysql/conf.d
  cat >/etc/mysql/conf.d/weft-cdc.cnf <<'CNF'
# written by weft's .ci/services.sh: the binlog the mysql_cdc source reads
[mysqld]
log_bin = mysql-bin
binlog_format = ROW
binlog_row_image = FULL
server_id = 1
# keep the disk bounded on long-lived machines (binlogs older than 3 days)
expire_logs_days = 3
CNF
  grep -q '^!includedir /etc/mysql/conf.d' /etc/mysql/my.cnf \
    || printf '\n!includedir /etc/mysql/conf.d/\n' >>/etc/mysql/my.cnf
  mysqladmin -h 127.0.0.1 -P 3306 -uroot shutdown || true
  for _ in $(seq 1 120); do pgrep -x mariadbd >/dev/null || break; sleep 0.5; done
  start-stop-daemon --start --oknodo --background --exec /usr/sbin/mariadbd || true
  for _ in $(seq 1 120); do my_sql 'SELECT 1' >/dev/null && break; sleep 0.5; done
  [ "$(my_sql 'SELECT @@log_bin')" = "1" ] || echo "WARNING: MariaDB binlog is not on"
fi
if ! up 4222; then
  echo "starting NATS"
  start-stop-daemon --start --oknodo --background --exec /usr/sbin/nats-server -- \
    -a 127.0.0.1 -p 4222 -js -sd /var/lib/nats-server -l /var/log/nats-server.log || true
fi
if ! up 5672; then
  echo "starting RabbitMQ"
  rabbitmq-server -detached || true
  # the Erlang node takes a few seconds; the amqp tests need it answering
  for _ in $(seq 1 120); do up 5672 && break; sleep 0.5; done
  up 5672 || echo "WARNING: RabbitMQ did not come up"
fi
if ! up 1883; then
  echo "starting Mosquitto"
  mosquitto -d -c /etc/mosquitto/mosquitto.conf || true
  wait_up 1883 || echo "WARNING: Mosquitto did not come up"
fi
if ! up 6379; then
  echo "starting Redis"
  mkdir -p /var/lib/redis /var/log/redis
  redis-server --daemonize yes --bind 127.0.0.1 -::1 --port 6379 --save "" --appendonly no \
    --dir /var/lib/redis --logfile /var/log/redis/ci.log || true
  # the redis tests need it answering (they fail under CI=true otherwise)
  wait_up 6379 || echo "WARNING: Redis did not come up"
fi
# tansu, a Kafka-compatible broker, for the kafka tests (they start a broker
# of their own on a free port, memory storage; the default features have no
# storage but a null one, hence dynostore). Built from the registry: 28 min
# wall (20.5 min of CPU) on this 2-core machine beside two other builds the
# first time; installed in ~/.cargo/bin, so only once per machine.
if ! command -v tansu >/dev/null 2>&1 && [ ! -x "${CARGO_HOME:-$HOME/.cargo}/bin/tansu" ]; then
  echo "installing tansu 0.6.0 (cargo install, features dynostore and libsql)"
  cargo install tansu --version 0.6.0 --locked --features dynostore,libsql --quiet \
    || echo "WARNING: cannot install tansu (the kafka tests fail under CI=true)"
fi
# the Python packages the metrics and CloudEvents tests parse with (their
# helper installs them too when they are missing)
python3 -c 'import prometheus_client, cloudevents' 2>/dev/null \
  || python3 -m pip install --quiet prometheus_client cloudevents \
  || echo "WARNING: cannot install prometheus_client and cloudevents"
# headless Chromium and its WebDriver for the dashboard's browser test
if [ ! -x /usr/bin/chromedriver ]; then
  echo "installing chromium and chromium-driver"
  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver; } >/dev/null 2>&1 \
    || echo "WARNING: cannot install chromium and chromium-driver (the dashboard test fails under CI=true)"
fi
exit 0
