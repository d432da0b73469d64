#!/usr/bin/env bash
# Local development stack for tm: PostgreSQL + a single-node Kafka (KRaft).
#
#   bash stack/stack.sh up|down|status|clean
#
# Uses what already answers at POSTGRES_HOST:POSTGRES_PORT / KAFKA_BROKERS;
# otherwise installs (apt, Maven Central) and starts its own services, with
# all state under .stack/ (git-ignored). `down` stops only what `up` started;
# `clean` also deletes the data (.stack/kafka/data, .stack/postgres).
#
# STACK_SECURE=1: also the secured services beside them (stack/secure.py, other ports).
#
# Redis (the optional task-event feed, REDIS_URL) is started only when asked for:
# STACK_REDIS=1 (what `make test` sets), or REDIS_URL pointing at the local default
# (redis://localhost:6379 or 127.0.0.1:6379); Debian's redis-server, no persistence.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
STACK_SRC="$ROOT/stack"
STATE="$ROOT/.stack"

POSTGRES_HOST="${POSTGRES_HOST:-localhost}"
POSTGRES_PORT="${POSTGRES_PORT:-5432}"
POSTGRES_USER="${POSTGRES_USER:-postgres}"
POSTGRES_PASSWORD="${POSTGRES_PASSWORD:-password}"
POSTGRES_DB="${POSTGRES_DB:-tasks_manager}"
KAFKA_BROKERS="${KAFKA_BROKERS:-localhost:9092}"
KAFKA_CONTROLLER_PORT="${KAFKA_CONTROLLER_PORT:-9093}"
KAFKA_VERSION="${KAFKA_VERSION:-}"          # empty: the version in stack/pom.xml
REDIS_URL="${REDIS_URL:-}"
STACK_REDIS="${STACK_REDIS:-}"
STACK_SECURE="${STACK_SECURE:-}"
R_PORT=6379
R_BASE="$STATE/redis"
R_PID="$R_BASE/redis.pid"
R_LOG="$R_BASE/redis.log"
PYTHON="${PYTHON:-python3}"

PG_BASE="$STATE/postgres"
PG_DATA="$PG_BASE/data"
PG_RUN="$PG_BASE/run"
PG_LOG="$PG_BASE/postgres.log"
PG_MARK="$PG_BASE/started-by-stack"

K_BASE="$STATE/kafka"
K_LIBS="$K_BASE/libs"
K_DATA="$K_BASE/data"
K_LOGS="$K_BASE/logs"
K_PROPS="$K_BASE/server.properties"
K_PID="$K_BASE/kafka.pid"
K_OUT="$K_LOGS/kafka.out"
K_STAMP="$K_LIBS/.resolved"
K_LOG4J="$STACK_SRC/kafka/log4j2.properties"

# first broker of KAFKA_BROKERS
K_FIRST="${KAFKA_BROKERS%%,*}"
K_FIRST="${K_FIRST#*://}"
K_HOST="${K_FIRST%:*}"
K_PORT="${K_FIRST##*:}"
[[ "$K_FIRST" == *:* ]] || { K_HOST="$K_FIRST"; K_PORT=9092; }
K_BOOTSTRAP="$K_HOST:$K_PORT"

say()  { echo "stack: $*"; }
die()  { echo "stack: $*" >&2; exit 1; }
fail() { # fail <log file> <message>: message, last 30 lines of the log, exit 1
    local log="$1"; shift
    echo "stack: $*" >&2
    if [[ -s "$log" ]]; then
        local cause
        cause="$(grep -E 'Caused by:|FATAL|ERROR' "$log" 2>/dev/null | tail -n 1 | cut -c1-300 || true)"
        [[ -n "$cause" ]] && echo "stack: cause: $cause" >&2
        echo "---- last 30 lines of $log ----" >&2
        tail -n 30 "$log" >&2
        echo "----" >&2
    fi
    exit 1
}

is_local_host() { [[ "$1" == localhost || "$1" == 127.0.0.1 || "$1" == ::1 || "$1" == "[::1]" ]]; }

# ---------------------------------------------------------------- apt
APT_UPDATED=0
apt_install() { # apt_install <pkg>...
    [[ $EUID -eq 0 ]] || die "need root to apt-get install $*"
    if [[ $APT_UPDATED -eq 0 ]]; then
        apt-get update -qq >/dev/null || die "apt-get update failed"
        APT_UPDATED=1
    fi
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null \
        || die "apt-get install $* failed"
}

# ================================================================ PostgreSQL
PG_BIN=""

need_pg_client() {
    command -v pg_isready >/dev/null && command -v psql >/dev/null && return 0
    say "postgres: installing postgresql-client (apt)"
    apt_install postgresql-client
}

pg_answers() { pg_isready -q -h "$POSTGRES_HOST" -p "$POSTGRES_PORT" -t 3 >/dev/null 2>&1; }

# psql over TCP with the configured credentials
pg_tcp() { PGPASSWORD="$POSTGRES_PASSWORD" PGCONNECT_TIMEOUT=5 psql -X -q -v ON_ERROR_STOP=1 \
    -h "$POSTGRES_HOST" -p "$POSTGRES_PORT" -U "$POSTGRES_USER" "$@"; }
# psql over our cluster's unix socket as the bootstrap superuser (trust)
pg_sock() { psql -X -q -v ON_ERROR_STOP=1 -h "$PG_RUN" -p "$POSTGRES_PORT" -U postgres "$@"; }

as_pg() { if [[ $EUID -eq 0 ]]; then runuser -u postgres -- "$@"; else "$@"; fi; }

pg_can_login() { pg_tcp -d postgres -tAc 'select 1' >/dev/null 2>&1; }

# pid of our cluster's postmaster if it is running from our data dir, else empty
# (pg_own_pid any: on whatever port it listens)
pg_own_pid() {
    local f="$PG_DATA/postmaster.pid" pid port
    [[ -r "$f" ]] || return 0
    pid="$(sed -n 1p "$f")"; port="$(sed -n 4p "$f")"
    if [[ -n "$pid" ]] && kill -0 "$pid" 2>/dev/null && [[ "${1:-}" == any || "$port" == "$POSTGRES_PORT" ]]; then
        echo "$pid"
    fi
}

pg_ensure_db() { # via TCP with the configured credentials
    local out
    if ! out="$(pg_tcp -d postgres -v db="$POSTGRES_DB" -v u="$POSTGRES_USER" 2>&1 <<'SQL'
SELECT NOT EXISTS (SELECT 1 FROM pg_database WHERE datname = :'db') AS need_db \gset
\if :need_db
CREATE DATABASE :"db" OWNER :"u";
\echo created
\endif
SQL
)"; then
        echo "$out" | tail -n 5 >&2
        die "postgres: create database $POSTGRES_DB failed (as $POSTGRES_USER)"
    fi
    if [[ "$out" == *created* ]]; then say "postgres: created database $POSTGRES_DB"; fi
}

pg_ensure_role() { # via our cluster's socket: role + password for POSTGRES_USER
    pg_sock -d postgres -v u="$POSTGRES_USER" -v pw="$POSTGRES_PASSWORD" >/dev/null <<'SQL' \
        || fail "$PG_LOG" "postgres: setting role/password for $POSTGRES_USER failed"
SELECT NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = :'u') AS need_role \gset
\if :need_role
CREATE ROLE :"u" SUPERUSER LOGIN;
\endif
ALTER ROLE :"u" WITH LOGIN PASSWORD :'pw';
SQL
}

pg_find_bin() {
    local ver=""
    if [[ -f "$PG_DATA/PG_VERSION" ]]; then          # existing cluster: its own major version
        ver="$(cat "$PG_DATA/PG_VERSION")"
        [[ -x "/usr/lib/postgresql/$ver/bin/initdb" ]] \
            || die "postgres: $PG_DATA was made by PostgreSQL $ver, whose binaries are missing (run 'bash stack/stack.sh clean' or install postgresql-$ver)"
    else
        local initdb
        initdb="$(ls -d /usr/lib/postgresql/*/bin/initdb 2>/dev/null | sort -V | tail -n 1 || true)"
        [[ -n "$initdb" ]] || return 1
        ver="$(basename "$(dirname "$(dirname "$initdb")")")"
    fi
    PG_BIN="/usr/lib/postgresql/$ver/bin"
}

pg_install_server() {
    if pg_find_bin; then return 0; fi
    say "postgres: installing postgresql (apt)"
    apt_install postgresql
    mkdir -p "$STATE"; echo "postgresql installed by stack.sh on $(date -Is)" > "$STATE/apt-installed-postgresql"
    pg_find_bin || die "postgres: initdb still missing after installing postgresql"
    # the package may have created and started Debian's own 'main' cluster:
    # we installed it just now, so stop it (and keep it from starting on boot)
    if command -v pg_lsclusters >/dev/null; then
        local ver name st
        while read -r ver name _ st _; do
            [[ "$name" == main ]] || continue
            [[ -w "/etc/postgresql/$ver/main/start.conf" ]] && echo manual > "/etc/postgresql/$ver/main/start.conf"
            if [[ "$st" == online* ]]; then
                pg_ctlcluster "$ver" main stop && say "postgres: stopped Debian's $ver/main cluster (just installed)"
            fi
        done < <(pg_lsclusters -h 2>/dev/null)
    fi
}

pg_prepare_dirs() {
    id postgres >/dev/null 2>&1 || useradd --system --home-dir /var/lib/postgresql --shell /bin/bash postgres
    mkdir -p "$PG_BASE" "$PG_RUN"
    if [[ $EUID -eq 0 ]]; then
        chown -R postgres:postgres "$PG_BASE"
        chmod 755 "$PG_BASE" "$PG_RUN"     # data/ itself stays 0700 (initdb)
        # the postgres user must be able to traverse every parent directory
        if ! runuser -u postgres -- test -w "$PG_BASE"; then
            local d="$STATE"
            while [[ "$d" != / ]]; do
                if ! runuser -u postgres -- test -x "$d"; then chmod o+x "$d"; fi
                d="$(dirname "$d")"
            done
            runuser -u postgres -- test -w "$PG_BASE" \
                || die "postgres: user postgres cannot write $PG_BASE"
            say "postgres: made the parents of $PG_BASE traversable (o+x)"
        fi
    fi
}

pg_initdb() {
    say "postgres: initdb $PG_DATA (PostgreSQL $(basename "$(dirname "$PG_BIN")"))"
    as_pg "$PG_BIN/initdb" -D "$PG_DATA" -U postgres -E UTF8 --locale=C.UTF-8 \
        --auth-local=trust --auth-host=scram-sha-256 > "$PG_BASE/initdb.log" 2>&1 \
        || fail "$PG_BASE/initdb.log" "postgres: initdb failed"
    cat >> "$PG_DATA/postgresql.conf" <<CONF

# ---- tm local dev stack (stack/stack.sh) ----
listen_addresses = '127.0.0.1'
port = $POSTGRES_PORT
unix_socket_directories = '$PG_RUN'
max_connections = 200
shared_buffers = 512MB
effective_cache_size = 4GB
work_mem = 16MB
maintenance_work_mem = 256MB
wal_level = minimal
max_wal_senders = 0
max_wal_size = 2GB
fsync = on
synchronous_commit = on
logging_collector = off
CONF
}

pg_start_own() {
    local opts="-p $POSTGRES_PORT -c listen_addresses=127.0.0.1 -k $PG_RUN"
    say "postgres: starting own cluster on 127.0.0.1:$POSTGRES_PORT"
    if ! as_pg "$PG_BIN/pg_ctl" -D "$PG_DATA" -l "$PG_LOG" -o "$opts" -w -t 60 start >/dev/null 2>&1; then
        fail "$PG_LOG" "postgres: start failed"
    fi
    date -Is > "$PG_MARK"
    [[ $EUID -eq 0 ]] && chown postgres:postgres "$PG_MARK"
}

pg_up() {
    need_pg_client
    if pg_answers; then
        if ! pg_can_login; then
            if [[ -n "$(pg_own_pid)" ]]; then      # our cluster: we may fix the role
                pg_ensure_role
                pg_can_login || die "postgres: cannot log in to $POSTGRES_HOST:$POSTGRES_PORT as $POSTGRES_USER even after resetting its password"
                say "postgres: reset role/password of $POSTGRES_USER"
            else
                die "postgres: $POSTGRES_HOST:$POSTGRES_PORT answers but $POSTGRES_USER cannot log in with POSTGRES_PASSWORD (check POSTGRES_USER/POSTGRES_PASSWORD)"
            fi
        fi
        pg_ensure_db
        if [[ -n "$(pg_own_pid)" ]]; then
            say "postgres: already running (this stack) at $POSTGRES_HOST:$POSTGRES_PORT"
        else
            say "postgres: using external server at $POSTGRES_HOST:$POSTGRES_PORT"
        fi
        return 0
    fi
    is_local_host "$POSTGRES_HOST" \
        || die "postgres: $POSTGRES_HOST:$POSTGRES_PORT does not answer and is not local: start it or point POSTGRES_HOST at a running server"

    pg_install_server
    pg_prepare_dirs
    [[ -f "$PG_DATA/PG_VERSION" ]] || pg_initdb
    # stale pid file from a crash: pg_ctl handles it; a live postmaster on another port does not
    if [[ -r "$PG_DATA/postmaster.pid" ]] && kill -0 "$(sed -n 1p "$PG_DATA/postmaster.pid")" 2>/dev/null; then
        die "postgres: our cluster $PG_DATA is running, but not on port $POSTGRES_PORT (stop it: bash stack/stack.sh down)"
    fi
    pg_start_own
    pg_ensure_role
    pg_can_login || fail "$PG_LOG" "postgres: cannot log in over TCP as $POSTGRES_USER after setup"
    pg_ensure_db
    say "postgres: ready at 127.0.0.1:$POSTGRES_PORT (user $POSTGRES_USER, db $POSTGRES_DB)"
}

pg_down() {
    local pid; pid="$(pg_own_pid any)"
    if [[ -f "$PG_MARK" && -n "$pid" ]]; then
        pg_find_bin
        as_pg "$PG_BIN/pg_ctl" -D "$PG_DATA" -m fast -w -t 60 stop >/dev/null 2>&1 \
            || fail "$PG_LOG" "postgres: stop failed"
        rm -f "$PG_MARK"
        say "postgres: stopped (pid $pid)"
    elif [[ -n "$pid" ]]; then
        say "postgres: running from $PG_DATA but not started by 'up'; left running"
    else
        rm -f "$PG_MARK"
        say "postgres: not started by this stack; nothing to stop"
    fi
}

listen_pid() { # pid listening on a TCP port, or '-'
    local p=""
    if command -v ss >/dev/null; then
        p="$(ss -ltnpH "sport = :$1" 2>/dev/null | grep -o 'pid=[0-9]*' | head -n 1 | cut -d= -f2 || true)"
    fi
    echo "${p:--}"
}

pg_status() { # prints one line; returns 0 if it answers
    local pid by data state rc=1
    command -v pg_isready >/dev/null || { echo "postgres: not running ($POSTGRES_HOST:$POSTGRES_PORT; pg_isready not installed)"; return 1; }
    pid="$(pg_own_pid)"
    if pg_answers; then state=running; rc=0
    elif [[ -n "$pid" ]]; then state="not answering"
    else state="not running"; fi
    if [[ -n "$pid" ]]; then
        by=$([[ -f "$PG_MARK" ]] && echo "this stack" || echo "this stack's data dir, started by hand")
        data="$PG_DATA"
    elif [[ $rc -eq 0 ]]; then
        by=external; data="-"; pid="$(is_local_host "$POSTGRES_HOST" && listen_pid "$POSTGRES_PORT" || echo -)"
    else
        by="-"; pid="-"; data=$([[ -f "$PG_DATA/PG_VERSION" ]] && echo "$PG_DATA" || echo "-")
    fi
    echo "postgres: $state  $POSTGRES_HOST:$POSTGRES_PORT  pid=$pid  started-by=$by  data=$data"
    return $rc
}

# ================================================================ Kafka
need_java() {
    command -v java >/dev/null && return 0
    say "kafka: installing a Java runtime (apt)"
    apt_install openjdk-17-jre-headless
}

need_mvn() {
    command -v mvn >/dev/null && return 0
    say "kafka: installing maven (apt)"
    apt_install maven
}

k_java() { # java with the kafka classpath, tools logging to .stack/kafka/logs/tools.log
    java -Xms64m -Xmx512m -Dlog4j2.configurationFile="$K_LOG4J" -Dkafka.logs.dir="$K_LOGS" \
        -Dstack.log.file=tools.log -cp "$K_LIBS/*" "$@"
}

k_main_class() { # k_main_class <Name>: the class that exists in the resolved jars
    local n="$1"
    if grep -qaF "org/apache/kafka/tools/$n.class" "$K_LIBS"/*.jar 2>/dev/null; then echo "org.apache.kafka.tools.$n"
    elif grep -qaF "kafka/tools/$n.class" "$K_LIBS"/*.jar 2>/dev/null; then echo "kafka.tools.$n"
    elif grep -qaF "kafka/admin/$n.class" "$K_LIBS"/*.jar 2>/dev/null; then echo "kafka.admin.$n"
    else return 1; fi
}

# Readiness probe: does the broker answer a METADATA request?
# confluent-kafka (PYTHON) if importable, else a JVM-side tool, else TCP.
K_PROBE=""
k_probe_kind() {
    [[ -n "$K_PROBE" ]] && return 0
    if command -v "$PYTHON" >/dev/null 2>&1 && "$PYTHON" -c 'import confluent_kafka' >/dev/null 2>&1; then
        K_PROBE=python
    elif command -v java >/dev/null && ls "$K_LIBS"/kafka-clients-*.jar >/dev/null 2>&1 \
         && k_main_class BrokerApiVersionsCommand >/dev/null; then
        K_PROBE=jvm
    else
        K_PROBE=tcp
    fi
}

k_answers() { # k_answers [timeout_seconds]
    local t="${1:-5}"
    k_probe_kind
    # quick TCP check first: both real probes are slow to give up on a closed port
    (exec 3<>"/dev/tcp/$K_HOST/$K_PORT") 2>/dev/null || return 1
    case "$K_PROBE" in
    python)
        "$PYTHON" - "$K_BOOTSTRAP" "$t" >/dev/null 2>&1 <<'PY'
import sys
from confluent_kafka.admin import AdminClient
a = AdminClient({"bootstrap.servers": sys.argv[1], "log_level": 0,
                 "socket.connection.setup.timeout.ms": 3000})
md = a.list_topics(timeout=float(sys.argv[2]))
sys.exit(0 if md.brokers else 1)
PY
        ;;
    jvm)
        local cfg="$K_BASE/probe.properties"
        mkdir -p "$K_BASE" "$K_LOGS"
        printf 'request.timeout.ms=%d\ndefault.api.timeout.ms=%d\n' $((t*1000)) $((t*1000)) > "$cfg"
        timeout $((t+15)) java -Xms32m -Xmx256m -XX:TieredStopAtLevel=1 \
            -Dlog4j2.configurationFile="$K_LOG4J" -Dkafka.logs.dir="$K_LOGS" -Dstack.log.file=tools.log \
            -cp "$K_LIBS/*" "$(k_main_class BrokerApiVersionsCommand)" \
            --bootstrap-server "$K_BOOTSTRAP" --command-config "$cfg" 2>/dev/null | grep -q '(id:'
        ;;
    *)
        true    # TCP only: already checked above
        ;;
    esac
}

k_own_pid() { # pid of the broker we started, if it is still alive
    [[ -r "$K_PID" ]] || return 0
    local pid; pid="$(cat "$K_PID")"
    if [[ -n "$pid" ]] && kill -0 "$pid" 2>/dev/null && tr '\0' ' ' < "/proc/$pid/cmdline" 2>/dev/null | grep -q 'kafka\.Kafka'; then
        echo "$pid"
    fi
}

k_resolve() {
    local sum
    sum="$( (sha256sum < "$STACK_SRC/pom.xml"; echo "$KAFKA_VERSION") | sha256sum | cut -c1-16)"
    if [[ -f "$K_STAMP" && "$(cat "$K_STAMP")" == "$sum" ]]; then
        return 0
    fi
    need_mvn
    say "kafka: resolving jars with Maven into .stack/kafka/libs"
    rm -rf "$K_LIBS"; mkdir -p "$K_LIBS" "$K_LOGS"
    local vflag=()
    [[ -n "$KAFKA_VERSION" ]] && vflag=(-Dkafka.version="$KAFKA_VERSION")
    if ! mvn -B -q -f "$STACK_SRC/pom.xml" "${vflag[@]}" dependency:copy-dependencies \
            -DoutputDirectory="$K_LIBS" > "$K_LOGS/mvn.log" 2>&1; then
        rm -rf "$K_LIBS"
        fail "$K_LOGS/mvn.log" "kafka: resolving jars with Maven failed (try KAFKA_VERSION=4.0.0 or another 4.x)"
    fi
    echo "$sum" > "$K_STAMP"
}

k_write_props() {
    mkdir -p "$K_DATA" "$K_LOGS"
    sed -e "s|@PORT@|$K_PORT|g" -e "s|@CONTROLLER_PORT@|$KAFKA_CONTROLLER_PORT|g" \
        -e "s|@DATA_DIR@|$K_DATA|g" "$STACK_SRC/kafka/server.properties" > "$K_PROPS.tmp"
    mv "$K_PROPS.tmp" "$K_PROPS"
}

k_format() {
    [[ -f "$K_DATA/meta.properties" ]] && return 0
    local cls id log="$K_LOGS/format.log"
    cls="$(k_main_class StorageTool)" || die "kafka: format storage failed: no StorageTool class in .stack/kafka/libs"
    id="$(k_java "$cls" random-uuid 2>"$log" | tail -n 1)" || fail "$log" "kafka: format storage failed (random-uuid)"
    [[ -n "$id" ]] || fail "$log" "kafka: format storage failed (empty cluster id)"
    if ! k_java "$cls" format -t "$id" -c "$K_PROPS" >> "$log" 2>&1; then
        fail "$log" "kafka: format storage failed"
    fi
    say "kafka: formatted storage in .stack/kafka/data (cluster id $id)"
}

k_start() {
    rm -f "$K_PID"
    : > "$K_OUT"
    say "kafka: starting broker+controller on 127.0.0.1:$K_PORT (controller :$KAFKA_CONTROLLER_PORT)"
    # setsid: own session, survives the calling shell; the inner bash writes its
    # pid and exec's java, so the pid file holds the JVM's pid
    setsid nohup bash -c 'echo $$ > "$1"; shift; exec "$@"' _ "$K_PID" \
        java -Xms512m -Xmx1g -XX:+UseG1GC -XX:MaxGCPauseMillis=20 -XX:+ExitOnOutOfMemoryError \
        -Djava.awt.headless=true -Dkafka.logs.dir="$K_LOGS" \
        -Dlog4j2.configurationFile="$K_LOG4J" \
        -cp "$K_LIBS/*" kafka.Kafka "$K_PROPS" > "$K_OUT" 2>&1 < /dev/null &
    local i
    for i in 1 2 3 4 5 6 7 8 9 10; do [[ -s "$K_PID" ]] && break; sleep 0.2; done
    [[ -s "$K_PID" ]] || fail "$K_OUT" "kafka: start failed (no pid)"
}

k_wait() {
    local pid deadline=$((SECONDS + 60))
    pid="$(cat "$K_PID")"
    while (( SECONDS < deadline )); do
        if ! kill -0 "$pid" 2>/dev/null; then
            fail "$K_LOGS/server.log" "kafka: broker exited during startup (pid $pid); see also $K_OUT"
        fi
        if k_answers 3; then return 0; fi
        sleep 1
    done
    fail "$K_LOGS/server.log" "kafka: broker did not answer a METADATA request at $K_BOOTSTRAP within 60 s (pid $pid, still running)"
}

k_up() {
    # probe with confluent-kafka or a TCP check first; the JVM tool needs the libs
    if k_answers 5; then
        if [[ -n "$(k_own_pid)" ]]; then say "kafka: already running (this stack) at $K_BOOTSTRAP"
        else say "kafka: using external broker at $K_BOOTSTRAP"; fi
        return 0
    fi
    is_local_host "$K_HOST" \
        || die "kafka: $K_BOOTSTRAP does not answer and is not local: start it or point KAFKA_BROKERS at a running broker"
    local pid; pid="$(k_own_pid)"
    if [[ -n "$pid" ]]; then   # ours, alive, but not answering (yet): wait for it
        say "kafka: broker (pid $pid) running but not answering yet; waiting"
        k_wait; say "kafka: ready at $K_BOOTSTRAP"; return 0
    fi
    need_java
    k_resolve
    K_PROBE=""                 # libs may now allow the JVM probe
    k_write_props
    k_format
    k_start
    k_wait
    say "kafka: ready at $K_BOOTSTRAP (pid $(cat "$K_PID"), probe: $K_PROBE)"
}

k_down() {
    local pid; pid="$(k_own_pid)"
    if [[ -z "$pid" ]]; then
        rm -f "$K_PID"
        say "kafka: not started by this stack; nothing to stop"
        return 0
    fi
    kill -TERM "$pid" 2>/dev/null || true
    local i
    for ((i = 0; i < 300; i++)); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.1
    done
    if kill -0 "$pid" 2>/dev/null; then
        kill -KILL "$pid" 2>/dev/null || true
        say "kafka: broker did not stop within 30 s; killed (pid $pid)"
    else
        say "kafka: stopped (pid $pid)"
    fi
    rm -f "$K_PID"
}

k_status() {
    local pid by data state rc=1
    pid="$(k_own_pid)"
    if k_answers 5; then state=running; rc=0
    elif [[ -n "$pid" ]]; then state="not answering"
    else state="not running"; fi
    if [[ -n "$pid" ]]; then
        by="this stack"; data="$K_DATA"
    elif [[ $rc -eq 0 ]]; then
        by=external; data="-"; pid="$(is_local_host "$K_HOST" && listen_pid "$K_PORT" || echo -)"
    else
        by="-"; pid="-"; data=$([[ -f "$K_DATA/meta.properties" ]] && echo "$K_DATA" || echo "-")
    fi
    echo "kafka:    $state  $K_BOOTSTRAP  pid=$pid  started-by=$by  data=$data"
    return $rc
}

# ================================================================ redis
r_wanted() {
    [[ "$STACK_REDIS" == 1 ]] && return 0
    [[ "$REDIS_URL" =~ ^redis://(localhost|127\.0\.0\.1)(:6379)?(/[0-9]*)?$ ]]
}

r_answers() { # PING over TCP, with bash's /dev/tcp (no client needed)
    local reply
    { exec 3<>"/dev/tcp/127.0.0.1/$R_PORT"; } 2>/dev/null || return 1
    printf 'PING\r\n' >&3
    read -r -t 2 reply <&3 || reply=""
    exec 3<&- 3>&-
    [[ "$reply" == +PONG* ]]
}

r_install() {
    command -v redis-server >/dev/null && return 0
    command -v apt-get >/dev/null || die "redis: redis-server missing and no apt-get: install Redis 6+"
    [[ $EUID -eq 0 ]] || die "redis: redis-server missing: run 'sudo apt-get install redis-server'"
    say "redis: installing redis-server (apt)"
    local policy=/usr/sbin/policy-rc.d made=0
    if [[ ! -e $policy ]]; then  # the package would start a system Redis on :6379
        printf '#!/bin/sh\nexit 101\n' > "$policy"; chmod 755 "$policy"; made=1
    fi
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends redis-server \
        > "$STATE/redis-apt.log" 2>&1 || { apt-get update -q > /dev/null 2>&1 && \
        DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends redis-server \
        > "$STATE/redis-apt.log" 2>&1; } || fail "$STATE/redis-apt.log" "redis: apt-get install failed"
    [[ $made -eq 1 ]] && rm -f "$policy"
    return 0
}

r_up() {
    r_wanted || return 0
    if r_answers; then say "redis: ready at 127.0.0.1:$R_PORT"; return 0; fi
    r_install
    mkdir -p "$R_BASE"
    redis-server --bind 127.0.0.1 --port "$R_PORT" --dir "$R_BASE" --save "" --appendonly no \
        --daemonize yes --pidfile "$R_PID" --logfile "$R_LOG" \
        || fail "$R_LOG" "redis: start failed"
    local i
    for i in $(seq 1 50); do r_answers && { say "redis: started at 127.0.0.1:$R_PORT"; return 0; }; sleep 0.1; done
    fail "$R_LOG" "redis: did not answer PING at 127.0.0.1:$R_PORT within 5 s"
}

r_down() {
    [[ -s "$R_PID" ]] || return 0
    local pid; pid="$(cat "$R_PID")"
    if kill "$pid" 2>/dev/null; then say "redis: stopped (pid $pid)"; fi
    rm -f "$R_PID"
}

# ================================================================ the secured stack
# STACK_SECURE=1 (what `make test` sets): beside the open services, a secured broker, PostgreSQL
# and Redis (stack/secure.py: TLS, SCRAM, mutual TLS, OAUTHBEARER), from the same jars and
# packages, with certificates made here at the first start.
s_up() {
    [[ "$STACK_SECURE" == 1 ]] || return 0
    need_java
    k_resolve
    pg_install_server
    r_install
    "$PYTHON" -c 'import cryptography, confluent_kafka' 2>/dev/null \
        || die "secure: $PYTHON lacks cryptography or confluent_kafka: run 'make venv' first"
    "$PYTHON" "$STACK_SRC/secure.py" up
}

s_down() {
    [[ -d "$STATE/secure" ]] || return 0
    "$PYTHON" "$STACK_SRC/secure.py" down
}

# ================================================================ main
usage() { echo "usage: bash stack/stack.sh up|down|status|clean|kafka-libs" >&2; exit 2; }

cmd="${1:-}"
case "$cmd" in
up)
    mkdir -p "$STATE"
    pg_up
    k_up
    r_up
    s_up
    ;;
down)
    s_down
    r_down
    k_down
    pg_down
    ;;
kafka-libs) # the broker's jars only (tests/chaos starts brokers of its own from them)
    mkdir -p "$STATE"
    need_java
    k_resolve
    ;;
status)
    rc=0
    pg_status || rc=1
    k_status || rc=1
    if [[ "$STACK_SECURE" == 1 ]]; then "$PYTHON" "$STACK_SRC/secure.py" status || rc=1; fi
    exit $rc
    ;;
clean)
    k_down
    pg_down
    rm -rf "$K_DATA" "$PG_BASE" "$K_PROPS" "$K_BASE/probe.properties"
    say "clean: deleted .stack/kafka/data and .stack/postgres (kept .stack/kafka/libs)"
    ;;
*) usage ;;
esac
