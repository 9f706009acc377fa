#!/usr/bin/env bash
# ensure-nginx.sh — make Debian's nginx available for the reverse-proxy test (tests/test_nginx.py)
# and for deploy/nginx/enclave.conf. Idempotent: installs with apt-get only when nginx is missing
# (nginx-light where the release still has it, else nginx). Only the binary is needed: the test runs
# its own nginx (own config, pid file and logs in a temporary folder); no system service is touched.
# Progress goes to stderr; stdout carries one line, the path of the nginx binary.
set -euo pipefail

log() { printf '[ensure-nginx] %s\n' "$*" >&2; }

find_nginx() {
    command -v nginx 2>/dev/null || { [[ -x /usr/sbin/nginx ]] && echo /usr/sbin/nginx; }
}

if ! bin="$(find_nginx)" || [[ -z "$bin" ]]; then
    if [[ "$(id -u)" -ne 0 ]]; then
        log "nginx not found and not running as root; install it with: sudo apt-get install -y nginx-light"
        exit 1
    fi
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >&2
    pkg=nginx
    if apt-cache show nginx-light >/dev/null 2>&1; then
        pkg=nginx-light
    fi
    log "installing $pkg"
    # policy-rc.d 101: the package must not start (or enable) the system nginx on port 80.
    policy=/usr/sbin/policy-rc.d
    created_policy=0
    if [[ ! -e "$policy" ]]; then
        printf '#!/bin/sh\nexit 101\n' > "$policy"
        chmod 755 "$policy"
        created_policy=1
    fi
    apt-get install -y -qq --no-install-recommends "$pkg" >&2 || { [[ $created_policy == 1 ]] && rm -f "$policy"; exit 1; }
    [[ $created_policy == 1 ]] && rm -f "$policy"
    bin="$(find_nginx)" || { log "nginx installed but not found"; exit 1; }
fi
log "nginx ready: $("$bin" -v 2>&1)"
echo "$bin"
