#!/usr/bin/env bash
# System packages the tests use beyond Python: a headless Chromium for tests/test_report.py.
# Idempotent: does nothing when a Chromium is already installed. Without one that test skips.
set -euo pipefail
for browser in chromium chromium-browser google-chrome google-chrome-stable; do
  if command -v "$browser" >/dev/null 2>&1; then
    echo "ci-system-deps: $browser is installed"
    exit 0
  fi
done
if ! command -v apt-get >/dev/null 2>&1; then
  echo "ci-system-deps: no apt-get here; install Chromium to run the browser test of report.html" >&2
  exit 0
fi
SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
$SUDO apt-get update -qq
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq chromium
