# shellcheck shell=bash disable=SC2034  # the variables are used by the scripts that source this
# Paths and process checks shared by start.sh and stop.sh (sourced, not run).
# Everything the local Slurm writes lives under POLAR_SLURM_STATE_DIR.

STATE_DIR=${POLAR_SLURM_STATE_DIR:-/var/lib/polar-slurm}
CLUSTER=${POLAR_SLURM_CLUSTER:-polar}

CONF_DIR=$STATE_DIR/etc
RUN_DIR=$STATE_DIR/run
LOG_DIR=$STATE_DIR/log
MUNGE_DIR=$STATE_DIR/munge
MUNGE_SOCKET=$MUNGE_DIR/munge.socket.2
MYSQL_DATA_DIR=$STATE_DIR/mysql
MYSQL_RUN_DIR=$STATE_DIR/mysqld
MYSQL_SOCKET=$MYSQL_RUN_DIR/mysqld.sock
# Marks a directory as ours, so that stop.sh --purge never deletes anything else.
STATE_MARKER=$STATE_DIR/.polar-slurm

# The daemons see their configuration through SLURM_CONF; client commands (sbatch, sinfo,
# submitit) find it through the /etc/slurm/slurm.conf link that start.sh makes.
export SLURM_CONF=$CONF_DIR/slurm.conf
SYSTEM_SLURM_CONF=/etc/slurm/slurm.conf

# Daemon name -> pid file, in start order.
DAEMONS=(munged mariadbd slurmdbd slurmctld slurmd)
declare -A PID_FILES=(
    [munged]=$MUNGE_DIR/munged.pid
    [mariadbd]=$MYSQL_RUN_DIR/mariadbd.pid
    [slurmdbd]=$RUN_DIR/slurmdbd.pid
    [slurmctld]=$RUN_DIR/slurmctld.pid
    [slurmd]=$RUN_DIR/slurmd.pid
)

# Succeed if process $1 exists and is not a zombie. A killed daemon is reparented to PID 1,
# which here may reap it only seconds later; until then /proc still shows it.
pid_alive() {
    local stat state
    stat=$(cat "/proc/$1/stat" 2>/dev/null) || return 1
    # The state is the first field after the command name in parentheses.
    state=${stat##*) }
    [[ ${state%% *} != [ZX] ]]
}

# Print the pid of daemon $1 and succeed only if its pid file names a live process of that
# name: a pid file left by a killed daemon may name a pid reused by something else.
daemon_pid() {
    local name=$1 pid_file=${PID_FILES[$1]} pid comm
    [[ -r $pid_file ]] || return 1
    pid=$(tr -dc '0-9' <"$pid_file")
    [[ -n $pid ]] && pid_alive "$pid" || return 1
    comm=$(cat "/proc/$pid/comm" 2>/dev/null) || return 1
    # Debian installs the Slurm daemons as alternatives of slurmctld-wlm, slurmd-wlm.
    [[ $comm == "$name" || $comm == "$name-wlm" ]] || return 1
    echo "$pid"
}

daemon_running() {
    daemon_pid "$1" >/dev/null
}
