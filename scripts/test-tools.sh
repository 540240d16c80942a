#!/usr/bin/env bash
# What the tests need from Debian: chromium for the dashboard's browser test (Playwright drives it
# through executable_path; `playwright install` would download a browser, which this project
# never does) and docker-compose to validate docker-compose.yml (there is no Docker engine here).
# Idempotent: installs only what is missing.
set -euo pipefail

missing=()
[ -x /usr/bin/chromium ] || missing+=(chromium)
command -v docker-compose >/dev/null || missing+=(docker-compose)
if [ ${#missing[@]} -gt 0 ]; then
  if ! command -v apt-get >/dev/null; then
    echo "test tools: no apt-get here; the tests needing ${missing[*]} will be skipped"
    exit 0
  fi
  SUDO=""
  [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  echo "test tools: installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  $SUDO apt-get install -y --no-install-recommends "${missing[@]}" >/dev/null 2>&1 || {
    $SUDO apt-get update -qq
    $SUDO apt-get install -y --no-install-recommends "${missing[@]}" >/dev/null
  }
fi
echo "test tools: $(/usr/bin/chromium --version 2>/dev/null); $(docker-compose version --short 2>/dev/null)"
