#!/usr/bin/env bash
# Install Debian's Slurm, MUNGE and MariaDB packages for the local single-node Slurm.
# Idempotent: returns at once when every package is already installed.
set -euo pipefail

PACKAGES=(munge slurmctld slurmd slurm-client slurmdbd mariadb-server)

missing=()
for pkg in "${PACKAGES[@]}"; do
    if ! dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q 'install ok installed'; then
        missing+=("$pkg")
    fi
done
if [[ ${#missing[@]} -eq 0 ]]; then
    exit 0
fi

if [[ $EUID -ne 0 ]]; then
    echo "install.sh: must run as root to install: ${missing[*]}" >&2
    exit 1
fi

export DEBIAN_FRONTEND=noninteractive

# Only refresh the package lists when one of the packages has no install candidate
# (a fresh image may carry no lists at all).
needs_update=0
for pkg in "${missing[@]}"; do
    candidate=$(apt-cache policy "$pkg" 2>/dev/null | awk '/Candidate:/ {print $2}')
    if [[ -z "$candidate" || "$candidate" == "(none)" ]]; then
        needs_update=1
    fi
done
if [[ $needs_update -eq 1 ]]; then
    apt-get update -qq
fi

# The packages' post-install scripts would start the system-wide daemons; start.sh runs its
# own instances instead, so forbid service starts during the install unless a policy exists.
policy=/usr/sbin/policy-rc.d
added_policy=0
if [[ ! -e $policy ]]; then
    printf '#!/bin/sh\nexit 101\n' >"$policy"
    chmod 755 "$policy"
    added_policy=1
fi
cleanup() {
    if [[ $added_policy -eq 1 ]]; then
        rm -f "$policy"
    fi
}
trap cleanup EXIT

echo "install.sh: installing ${missing[*]}"
install_cmd=(apt-get install -y -qq --no-install-recommends "${missing[@]}")
if ! "${install_cmd[@]}"; then
    # Stale lists point at package versions the mirror no longer serves: refresh and retry.
    apt-get update -qq
    "${install_cmd[@]}"
fi
