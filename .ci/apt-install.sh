#!/usr/bin/env bash
# Idempotent installer of the Debian packages that tests use for real (Slurm, Chromium):
#   apt-install.sh "EXE ..." PACKAGE ...   -- a no-op when every EXE is already on PATH.
set -euo pipefail
# Daemons install to /usr/sbin, which a non-login PATH may lack.
export PATH="$PATH:/usr/sbin:/sbin"
exes=$1
shift
pkgs=("$@")

have_all() {
    for exe in $exes; do command -v "$exe" >/dev/null 2>&1 || return 1; done
}
have_all && exit 0

fail() { echo "apt-install ${pkgs[*]}: $*" >&2; exit 1; }

[ "$(id -u)" -eq 0 ] || fail "must run as root to apt-get install ${pkgs[*]}"
command -v apt-get >/dev/null 2>&1 || fail "apt-get not found (Debian/Ubuntu only)"

log=$(mktemp)
trap 'rm -f "$log"' EXIT
export DEBIAN_FRONTEND=noninteractive

# Refresh the index only when it is missing (fresh container); otherwise reuse it to save ~10 s.
if ! apt-cache show "${pkgs[@]}" >/dev/null 2>&1; then
    apt-get update -qq >"$log" 2>&1 || fail "apt-get update failed: $(tail -n 3 "$log" | tr '\n' ' ')"
fi
if ! apt-get install -y -qq --no-install-recommends "${pkgs[@]}" >"$log" 2>&1; then
    # A stale index can point at removed package versions: refresh once and retry.
    apt-get update -qq >"$log" 2>&1 || fail "apt-get update failed: $(tail -n 3 "$log" | tr '\n' ' ')"
    apt-get install -y -qq --no-install-recommends "${pkgs[@]}" >"$log" 2>&1 \
        || fail "apt-get install failed: $(tail -n 3 "$log" | tr '\n' ' ')"
fi
have_all || fail "still missing one of: $exes"
