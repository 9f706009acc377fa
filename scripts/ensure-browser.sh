#!/usr/bin/env bash
# Makes Debian's Chromium (for the end-to-end browser tests, driven by Playwright) and a CJK font
# (so Chinese renders in screenshots) available. Idempotent; installs with apt-get only when missing.
set -euo pipefail

need=()
command -v chromium >/dev/null || [[ -x /usr/bin/chromium ]] || need+=(chromium)
dpkg -s fonts-wqy-microhei >/dev/null 2>&1 || need+=(fonts-wqy-microhei)
if ((${#need[@]} == 0)); then
    echo "browser ready: $(chromium --version 2>/dev/null || echo /usr/bin/chromium)" >&2
    exit 0
fi
if [[ "$(id -u)" -ne 0 ]]; then
    echo "missing: ${need[*]}; install them as root: apt-get install -y ${need[*]}" >&2
    exit 1
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
echo "installed: ${need[*]}" >&2
