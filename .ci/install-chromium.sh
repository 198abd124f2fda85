#!/usr/bin/env bash
# Idempotent installer for Debian's Chromium + chromedriver, which the demo's browser test drives through Selenium
# (the tests never download a browser).
set -euo pipefail

if command -v chromium >/dev/null 2>&1 && command -v chromedriver >/dev/null 2>&1; then
    exit 0
fi

fail() { echo "install-chromium: $*" >&2; exit 1; }

[ "$(id -u)" -eq 0 ] || fail "must run as root to apt-get install chromium chromium-driver"
command -v apt-get >/dev/null 2>&1 || fail "apt-get not found (Debian/Ubuntu only)"

log=$(mktemp)
trap 'rm -f "$log"' EXIT
export DEBIAN_FRONTEND=noninteractive

# Refresh the index only when it is missing (fresh container); otherwise reuse it.
if ! apt-cache show chromium-driver >/dev/null 2>&1; then
    apt-get update -qq >"$log" 2>&1 || fail "apt-get update failed: $(tail -n 3 "$log" | tr '\n' ' ')"
fi
if ! apt-get install -y -qq --no-install-recommends chromium chromium-driver >"$log" 2>&1; then
    # A stale index can point at removed package versions: refresh once and retry.
    apt-get update -qq >"$log" 2>&1 || fail "apt-get update failed: $(tail -n 3 "$log" | tr '\n' ' ')"
    apt-get install -y -qq --no-install-recommends chromium chromium-driver >"$log" 2>&1 \
        || fail "apt-get install chromium chromium-driver failed: $(tail -n 3 "$log" | tr '\n' ' ')"
fi

for exe in chromium chromedriver; do
    command -v "$exe" >/dev/null 2>&1 || fail "$exe still not on PATH after installing chromium chromium-driver"
done
