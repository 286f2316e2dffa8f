#!/usr/bin/env bash
# Installs Debian's PostgreSQL, Redis and Chromium packages when they are missing (and the tools named as
# arguments). The tests start their own throwaway servers (and a Redis Cluster) on loopback from these
# binaries, and drive the dashboard in Chromium headless (Playwright cannot download its own browser
# here); nothing is left running.
set -euo pipefail
need=()
ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || need+=(postgresql)
command -v redis-server >/dev/null 2>&1 || need+=(redis-server)
command -v redis-cli >/dev/null 2>&1 || need+=(redis-tools)  # redis-cli --cluster create
[ -x /usr/bin/chromium ] || need+=(chromium)
command -v cc >/dev/null 2>&1 || need+=(gcc)  # the tests build Meterline's Redis module (meterline redis-module)
# More tools by name (a command of the Debian package of that name), e.g. `wrk` for the benchmarks.
for tool in "$@"; do command -v "$tool" >/dev/null 2>&1 || need+=("$tool"); done
if [ ${#need[@]} -eq 0 ]; then exit 0; fi
echo "installing: ${need[*]}"
SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq "${need[@]}" >/dev/null
