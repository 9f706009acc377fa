#!/usr/bin/env bash
# ensure-promtool.sh — make `promtool` (Prometheus' rule and config checker) available for the tests.
#
# Idempotent: does nothing when promtool is already on PATH; otherwise installs Debian's
# `prometheus` package (which ships /usr/bin/promtool) with apt-get, when running as root.
# The package's service is not started: containers have no init, and nothing here needs a server.
#
# stdout carries exactly one line, the path of promtool; progress goes to stderr.
set -euo pipefail

log() { printf '[ensure-promtool] %s\n' "$*" >&2; }
die() { printf '[ensure-promtool] ERROR: %s\n' "$*" >&2; exit 1; }

if ! command -v promtool >/dev/null 2>&1; then
    if [[ "$(id -u)" -ne 0 ]]; then
        die "promtool not found and not running as root; install it with: sudo apt-get install -y prometheus"
    fi
    log "promtool not found; installing the Debian package (apt-get install prometheus)"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update >&2
    # policy-rc.d 101: the package's post-install must not try to start the Prometheus service.
    if [[ ! -e /usr/sbin/policy-rc.d ]]; then
        printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d
        chmod +x /usr/sbin/policy-rc.d
        trap 'rm -f /usr/sbin/policy-rc.d' EXIT
    fi
    apt-get install -y --no-install-recommends prometheus >&2
    command -v promtool >/dev/null 2>&1 || die "prometheus installed but promtool still not on PATH"
fi
log "using $(promtool --version 2>&1 | head -n 1)"
command -v promtool
