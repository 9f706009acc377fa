#!/usr/bin/env bash
# ensure-ocr.sh — make Debian's Tesseract OCR available to `ingest run` (scanned PDFs and images)
# and to its tests. Idempotent: installs with apt-get only what is missing: the `tesseract` binary
# and the language data named by $OCR_LANGUAGES (default "eng+chi_sim", the default of the
# `ingest.ocr_languages` setting; Debian's packages are tesseract-ocr-<lang with - for _>).
# Also the two fonts the OCR tests render their pages with. Progress goes to stderr; stdout carries one line, the path of the tesseract binary.
# Without root it says what to run instead and exits 1 (ingestion still works: scanned files are
# then reported as skipped with the reason).
set -euo pipefail

log() { printf '[ensure-ocr] %s\n' "$*" >&2; }

languages="${OCR_LANGUAGES:-eng+chi_sim}"
IFS='+' read -r -a langs <<< "$languages"

missing=()
command -v tesseract >/dev/null 2>&1 || missing+=(tesseract-ocr)
# Fonts the OCR tests and bench/ocr.py render their scanned pages with (Latin and CJK).
for font in fonts-dejavu-core fonts-wqy-microhei; do
    dpkg -s "$font" >/dev/null 2>&1 || missing+=("$font")
done
installed_langs="$(tesseract --list-langs 2>/dev/null | tail -n +2 || true)"
for lang in "${langs[@]}"; do
    if ! grep -qx "$lang" <<< "$installed_langs"; then
        missing+=("tesseract-ocr-$(tr '_' '-' <<< "${lang,,}")")
    fi
done

if ((${#missing[@]})); then
    if [[ "$(id -u)" -ne 0 ]]; then
        log "missing: ${missing[*]}; install them with: sudo apt-get install -y --no-install-recommends ${missing[*]}"
        exit 1
    fi
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >&2
    log "installing ${missing[*]}"
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >&2
fi
bin="$(command -v tesseract)" || { log "tesseract installed but not found"; exit 1; }
log "tesseract ready: $("$bin" --version 2>&1 | head -n 1); languages: $("$bin" --list-langs 2>/dev/null | tail -n +2 | tr '\n' ' ')"
echo "$bin"
