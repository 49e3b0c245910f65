#!/usr/bin/env bash
# Stop the daemons of the local single-node Slurm that start.sh started. Idempotent.
#   stop.sh          stop the daemons; state (job ids, accounting, munge key) is kept
#   stop.sh --purge  also delete the state directory, so the next start.sh starts from nothing
# Jobs still running keep their slurmstepd; a later start.sh picks them up again.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source-path=SCRIPTDIR source=daemons.sh
source "$HERE/daemons.sh"

purge=0
case ${1:-} in
    "") ;;
    --purge) purge=1 ;;
    *)
        echo "usage: stop.sh [--purge]" >&2
        exit 2
        ;;
esac

if [[ $EUID -ne 0 ]]; then
    echo "stop.sh: must run as root" >&2
    exit 1
fi

stop_daemon() {
    local name=$1 pid waited=0
    if ! pid=$(daemon_pid "$name"); then
        echo "stop.sh: $name not running"
        return 0
    fi
    kill -TERM "$pid"
    # Up to 30 s: MariaDB flushes InnoDB, slurmctld saves its state.
    while pid_alive "$pid" && ((waited < 300)); do
        sleep 0.1
        waited=$((waited + 1))
    done
    if pid_alive "$pid"; then
        echo "stop.sh: $name (pid $pid) ignored SIGTERM for 30 s; killing it"
        kill -KILL "$pid" 2>/dev/null || true
    fi
    echo "stop.sh: stopped $name (pid $pid)"
}

# Reverse start order: the Slurm daemons still reach accounting and munge while stopping.
for ((i = ${#DAEMONS[@]} - 1; i >= 0; i--)); do
    stop_daemon "${DAEMONS[i]}"
done

if ((purge)); then
    if [[ -f $STATE_MARKER ]]; then
        rm -rf -- "$STATE_DIR"
        echo "stop.sh: removed $STATE_DIR"
    elif [[ -e $STATE_DIR ]]; then
        echo "stop.sh: $STATE_DIR has no $(basename "$STATE_MARKER") marker; not removing it" >&2
        exit 1
    fi
    if [[ $(readlink "$SYSTEM_SLURM_CONF" 2>/dev/null) == "$SLURM_CONF" ]]; then
        rm -f "$SYSTEM_SLURM_CONF"
    fi
fi
