#!/usr/bin/env bash
# Install what taxiway's tests, demo and benchmarks need on a fresh Debian 12:
# the Debian packages in .ci/apt-packages.txt (only the missing ones) and the
# podman configuration the DESIGN notes describe. Idempotent and quiet when
# everything is already there.
set -euo pipefail
cd "$(dirname "$0")/.."

want=$(grep -vE '^\s*(#|$)' .ci/apt-packages.txt)
missing=()
for p in $want; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "installing Debian packages: ${missing[*]}"
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# podman on these machines needs runc and ulimits it is allowed to set.
if [ "$(id -u)" -eq 0 ] && [ ! -f /etc/containers/containers.conf ]; then
  mkdir -p /etc/containers
  cat > /etc/containers/containers.conf <<'CONF'
[containers]
default_ulimits = ["nofile=1024:1024","nproc=1024:1024"]

[engine]
runtime = "runc"
CONF
fi
