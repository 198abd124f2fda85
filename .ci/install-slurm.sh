#!/usr/bin/env bash
# Idempotent installer for a real single-node Slurm used by tests/slurm_local.py (auth/none, so no munge needed).
set -euo pipefail
# The daemons install to /usr/sbin, which a non-login PATH may lack.
export PATH="$PATH:/usr/sbin:/sbin"

if command -v slurmctld >/dev/null 2>&1 && command -v slurmd >/dev/null 2>&1 && command -v sbatch >/dev/null 2>&1; then
    exit 0
fi

fail() { echo "install-slurm: $*" >&2; exit 1; }

[ "$(id -u)" -eq 0 ] || fail "must run as root to apt-get install slurm-wlm"
command -v apt-get >/dev/null 2>&1 || fail "apt-get not found (Debian/Ubuntu only)"

log=$(mktemp)
trap 'rm -f "$log"' EXIT
export DEBIAN_FRONTEND=noninteractive

# Refresh the index only when it is missing (fresh container); otherwise reuse it to save ~10 s.
if ! apt-cache show slurm-wlm >/dev/null 2>&1; then
    apt-get update -qq >"$log" 2>&1 || fail "apt-get update failed: $(tail -n 3 "$log" | tr '\n' ' ')"
fi
if ! apt-get install -y -qq --no-install-recommends slurm-wlm >"$log" 2>&1; then
    # A stale index can point at removed package versions: refresh once and retry.
    apt-get update -qq >"$log" 2>&1 || fail "apt-get update failed: $(tail -n 3 "$log" | tr '\n' ' ')"
    apt-get install -y -qq --no-install-recommends slurm-wlm >"$log" 2>&1 \
        || fail "apt-get install slurm-wlm failed: $(tail -n 3 "$log" | tr '\n' ' ')"
fi

for exe in slurmctld slurmd sbatch; do
    command -v "$exe" >/dev/null 2>&1 || fail "$exe still not on PATH after installing slurm-wlm"
done
