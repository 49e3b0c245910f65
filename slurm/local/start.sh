#!/usr/bin/env bash
# Start the local single-node Slurm (munged, MariaDB, slurmdbd, slurmctld, slurmd) and wait
# until its node is idle. Idempotent: daemons already running are left alone, so a second
# call only checks. Run as root on a test machine. Environment:
#   POLAR_SLURM_STATE_DIR  state, configuration and logs (default /var/lib/polar-slurm)
#   POLAR_SLURM_CLUSTER    cluster name in slurm.conf and accounting (default polar)
#   POLAR_SLURM_TIMEOUT    seconds to wait for each daemon (default 60)
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source-path=SCRIPTDIR source=daemons.sh
source "$HERE/daemons.sh"
TIMEOUT=${POLAR_SLURM_TIMEOUT:-60}
START_NS=$(date +%s%N)

# Seconds since the start, as S.mmm.
elapsed() {
    local ms=$((($(date +%s%N) - START_NS) / 1000000))
    printf '%d.%03d' $((ms / 1000)) $((ms % 1000))
}

log() {
    printf 'start.sh [%ss]: %s\n' "$(elapsed)" "$*"
}

# Print an error with the end of the given logs and exit.
fail() {
    local message=$1 logfile
    shift
    printf 'start.sh: ERROR: %s\n' "$message" >&2
    for logfile in "$@"; do
        printf -- '--- last lines of %s ---\n' "$logfile" >&2
        tail -n 25 "$logfile" >&2 2>/dev/null || printf '(no such file)\n' >&2
    done
    exit 1
}

# wait_until DESCRIPTION LOGFILE COMMAND...: retry COMMAND until it succeeds or TIMEOUT.
wait_until() {
    local what=$1 logfile=$2 deadline
    shift 2
    deadline=$((SECONDS + TIMEOUT))
    until "$@" >/dev/null 2>&1; do
        if ((SECONDS >= deadline)); then
            fail "$what not ready after ${TIMEOUT}s" "$logfile"
        fi
        sleep 0.2
    done
}

if [[ $EUID -ne 0 ]]; then
    echo "start.sh: must run as root (it installs packages and starts system daemons)" >&2
    exit 1
fi

"$HERE/install.sh"

# --- directories -------------------------------------------------------------------------
install -d -m 755 "$STATE_DIR" "$CONF_DIR" "$STATE_DIR/slurmd"
touch "$STATE_MARKER"
install -d -m 755 -o slurm -g slurm "$RUN_DIR" "$LOG_DIR" "$STATE_DIR/slurmctld"
install -d -m 755 -o munge -g munge "$MUNGE_DIR"
install -d -m 700 -o mysql -g mysql "$MYSQL_DATA_DIR"
install -d -m 755 -o mysql -g mysql "$MYSQL_RUN_DIR"

# --- munged ------------------------------------------------------------------------------
munge_key=$MUNGE_DIR/munge.key
if [[ ! -s $munge_key ]]; then
    mungekey --create --keyfile="$munge_key"
    chown munge:munge "$munge_key"
    chmod 600 "$munge_key"
fi
if daemon_running munged; then
    log "munged already running"
else
    log "starting munged"
    runuser -u munge -- munged --socket="$MUNGE_SOCKET" --key-file="$munge_key" \
        --pid-file="${PID_FILES[munged]}" --log-file="$MUNGE_DIR/munged.log" \
        --seed-file="$MUNGE_DIR/munged.seed" ||
        fail "munged did not start" "$MUNGE_DIR/munged.log"
fi
munge_roundtrip() {
    munge -n -S "$MUNGE_SOCKET" | unmunge -S "$MUNGE_SOCKET"
}
wait_until munged "$MUNGE_DIR/munged.log" munge_roundtrip

# --- MariaDB (accounting storage) --------------------------------------------------------
mariadb_log=$LOG_DIR/mariadbd.log
if [[ ! -d $MYSQL_DATA_DIR/mysql ]]; then
    log "initialising the accounting database"
    mariadb-install-db --no-defaults --user=mysql --datadir="$MYSQL_DATA_DIR" \
        --auth-root-authentication-method=socket --skip-test-db >>"$mariadb_log" 2>&1 ||
        fail "mariadb-install-db failed" "$mariadb_log"
fi
if daemon_running mariadbd; then
    log "mariadbd already running"
else
    log "starting mariadbd"
    # mariadbd does not daemonise: setsid detaches it from this shell's session so it
    # outlives the caller. --no-defaults ignores /etc/mysql; no TCP port at all. slurmdbd
    # logs that a 128 MB buffer pool is below its recommendation: plenty for tests.
    setsid mariadbd --no-defaults --user=mysql --datadir="$MYSQL_DATA_DIR" \
        --socket="$MYSQL_SOCKET" --pid-file="${PID_FILES[mariadbd]}" \
        --log-error="$mariadb_log" --skip-networking --skip-name-resolve \
        --innodb-lock-wait-timeout=900 \
        </dev/null >>"$mariadb_log" 2>&1 &
fi
mariadb_sql() {
    mariadb --no-defaults --socket="$MYSQL_SOCKET" --user=root --batch -e "$@"
}
wait_until mariadbd "$mariadb_log" mariadb_sql 'SELECT 1'
wait_until "mariadbd pid file" "$mariadb_log" daemon_running mariadbd
# slurmdbd connects as the unix user slurm; unix_socket authentication needs no password.
mariadb_sql "CREATE DATABASE IF NOT EXISTS slurm_acct_db;
    CREATE USER IF NOT EXISTS 'slurm'@'localhost' IDENTIFIED VIA unix_socket;
    GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost';" ||
    fail "could not create the accounting database user" "$mariadb_log"

# --- configuration -----------------------------------------------------------------------
cpus=$(nproc)
# RealMemory a bit under the machine's memory: slurmd drains a node configured with more
# memory than it finds.
real_memory=$(awk '/^MemTotal:/ {printf "%d", $2 / 1024 * 0.85}' /proc/meminfo)

# Job ids must not repeat ids that accounting already holds. slurmctld saves its next job id
# only now and then; killed (not stopped), it would hand out ids again whose old records sacct
# (and so submitit) then reports for the new jobs. FirstJobId is a lower bound on new ids.
if daemon_running slurmctld && [[ -f $SLURM_CONF ]]; then
    first_job_id=$(sed -n 's/^FirstJobId=//p' "$SLURM_CONF")
else
    last_job_id=$(mariadb_sql "SELECT MAX(id_job) FROM slurm_acct_db.${CLUSTER}_job_table" \
        --skip-column-names 2>/dev/null || true)
    first_job_id=$(( ${last_job_id//[^0-9]/} + 1 ))
fi

render() {
    sed -e "s|@STATE_DIR@|$STATE_DIR|g" -e "s|@CLUSTER@|$CLUSTER|g" \
        -e "s|@MUNGE_SOCKET@|$MUNGE_SOCKET|g" -e "s|@CPUS@|$cpus|g" \
        -e "s|@REAL_MEMORY@|$real_memory|g" -e "s|@FIRST_JOB_ID@|${first_job_id:-1}|g" "$1"
}

new_conf=$(render "$HERE/slurm.conf.in")
if [[ -f $SLURM_CONF ]] && [[ $new_conf != "$(cat "$SLURM_CONF")" ]] &&
    { daemon_running slurmctld || daemon_running slurmd; }; then
    log "WARNING: slurm.conf changed while Slurm runs; run stop.sh then start.sh to apply it"
fi
printf '%s\n' "$new_conf" >"$SLURM_CONF"
chmod 644 "$SLURM_CONF"
# slurmdbd refuses a configuration (it holds storage settings) readable by others.
render "$HERE/slurmdbd.conf.in" >"$CONF_DIR/slurmdbd.conf"
chown slurm:slurm "$CONF_DIR/slurmdbd.conf"
chmod 600 "$CONF_DIR/slurmdbd.conf"

# Client commands read /etc/slurm/slurm.conf; point it at ours, keeping a foreign one aside.
if [[ $(readlink "$SYSTEM_SLURM_CONF" 2>/dev/null) != "$SLURM_CONF" ]]; then
    if [[ -e $SYSTEM_SLURM_CONF && ! -L $SYSTEM_SLURM_CONF ]]; then
        mv "$SYSTEM_SLURM_CONF" "$SYSTEM_SLURM_CONF.before-polar"
        log "moved the existing $SYSTEM_SLURM_CONF to $SYSTEM_SLURM_CONF.before-polar"
    fi
    mkdir -p "$(dirname "$SYSTEM_SLURM_CONF")"
    ln -sfn "$SLURM_CONF" "$SYSTEM_SLURM_CONF"
fi

# --- slurmdbd ----------------------------------------------------------------------------
if daemon_running slurmdbd; then
    log "slurmdbd already running"
else
    log "starting slurmdbd"
    # The MySQL client library takes the socket path from MYSQL_UNIX_PORT.
    MYSQL_UNIX_PORT=$MYSQL_SOCKET slurmdbd ||
        fail "slurmdbd did not start" "$LOG_DIR/slurmdbd.log"
fi
wait_until slurmdbd "$LOG_DIR/slurmdbd.log" sacctmgr -n -P list cluster format=cluster

# slurmctld registers with accounting at start: add the cluster first.
if ! sacctmgr -n -P list cluster format=cluster | grep -qx "$CLUSTER"; then
    log "registering cluster $CLUSTER in accounting"
    sacctmgr -i -Q add cluster "$CLUSTER" >/dev/null
fi

# --- slurmctld and slurmd ----------------------------------------------------------------
if daemon_running slurmctld; then
    log "slurmctld already running"
else
    log "starting slurmctld"
    slurmctld || fail "slurmctld did not start" "$LOG_DIR/slurmctld.log"
fi
controller_up() {
    scontrol ping | grep -q 'is UP'
}
wait_until slurmctld "$LOG_DIR/slurmctld.log" controller_up

if daemon_running slurmd; then
    log "slurmd already running"
else
    log "starting slurmd"
    slurmd -N localhost || fail "slurmd did not start" "$LOG_DIR/slurmd.log"
fi

node_state() {
    sinfo -h -N -n localhost -o '%T' 2>/dev/null | head -n 1
}
# A node drained by an earlier failure (for example "Kill task failed") stays drained
# across restarts; this is a test machine, so put it back in service.
if [[ $(node_state) == *drain* ]]; then
    log "resuming the drained node: $(sinfo -h -N -n localhost -o '%E')"
    scontrol update NodeName=localhost State=RESUME || true
fi
# idle, or busy with jobs that others already submitted.
node_usable() {
    [[ $(node_state) =~ ^(idle|mixed|allocated|completing)$ ]]
}
deadline=$((SECONDS + TIMEOUT))
until node_usable; do
    if ((SECONDS >= deadline)); then
        fail "node localhost is '$(node_state)', not idle, after ${TIMEOUT}s" \
            "$LOG_DIR/slurmd.log" "$LOG_DIR/slurmctld.log"
    fi
    sleep 0.2
done

log "Slurm ready in $(elapsed) s: node localhost $(node_state), $cpus CPUs," \
    "${real_memory} MB; state and logs in $STATE_DIR"
