#!/usr/bin/env bash
# Installs the system packages driftline's alerting tests, deploy examples and page tests use:
# prometheus (with promtool), prometheus-alertmanager and chromium (headless, for the
# browser test of the page, tests/integration/test_ui_browser.py) (Debian/Ubuntu).
# Idempotent: does nothing when the binaries are already there. Works as root or via sudo.
set -euo pipefail

need=()
command -v prometheus >/dev/null 2>&1 && command -v promtool >/dev/null 2>&1 || need+=(prometheus)
command -v alertmanager >/dev/null 2>&1 || command -v prometheus-alertmanager >/dev/null 2>&1 \
  || need+=(prometheus-alertmanager)
command -v chromium >/dev/null 2>&1 || need+=(chromium)

if [ ${#need[@]} -eq 0 ]; then
  echo "install_system_deps: prometheus, promtool, alertmanager and chromium already installed"
  exit 0
fi

if [ "$(id -u)" -eq 0 ]; then
  SUDO=()
elif command -v sudo >/dev/null 2>&1; then
  SUDO=(sudo -n)
else
  echo "install_system_deps: need root or sudo to install: ${need[*]}" >&2
  exit 1
fi

if ! command -v apt-get >/dev/null 2>&1; then
  echo "install_system_deps: apt-get not found; install ${need[*]} with your package manager" >&2
  exit 1
fi

export DEBIAN_FRONTEND=noninteractive
# Refresh the package lists only when they are missing (apt-cache knows nothing of the package).
if ! apt-cache show "${need[0]}" >/dev/null 2>&1; then
  "${SUDO[@]}" apt-get update -qq
fi
# --no-install-recommends keeps it small; the packages' services are not started in containers.
"${SUDO[@]}" apt-get install -y -qq --no-install-recommends "${need[@]}"
echo "install_system_deps: installed ${need[*]}"
