#!/usr/bin/env bash
# Debian's Chromium for the dashboard's real-browser test (Playwright drives it through
# executable_path; `playwright install` would download a browser, which this project never does).
# Idempotent: does nothing once /usr/bin/chromium exists.
set -euo pipefail

if [ -x /usr/bin/chromium ]; then
  echo "browser: $(/usr/bin/chromium --version 2>/dev/null || echo chromium)"
  exit 0
fi
if ! command -v apt-get >/dev/null; then
  echo "browser: no apt-get here; the browser test will be skipped"
  exit 0
fi
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"
echo "browser: installing Debian's chromium"
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get install -y --no-install-recommends chromium >/dev/null 2>&1 || {
  $SUDO apt-get update -qq
  $SUDO apt-get install -y --no-install-recommends chromium >/dev/null
}
echo "browser: $(/usr/bin/chromium --version)"
