#!/usr/bin/env bash
# make demo: the main job on embedded defaults, on a fresh machine.
#
# Start taxiway's own multi-tenant registry on loopback (free port) with an org
# and a push token, push a small real busybox-static image to it with skopeo,
# then pull, list, inspect, export, scan, push and run it with taxiway. The
# registry is stopped at the end. Everything lives in a throwaway
# $TAXIWAY_HOME, so the demo never touches your store.
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
PATH="$REPO/.venv/bin:$PATH"
PY="$REPO/.venv/bin/python"

DEMO=$(mktemp -d "${TMPDIR:-/tmp}/taxiway-demo.XXXXXX")
export TAXIWAY_HOME="$DEMO/home" TAXIWAY_CONFIG="$DEMO/config"
REG_PID=""
cleanup() {
  if [ -n "$REG_PID" ]; then kill "$REG_PID" 2>/dev/null || true; wait "$REG_PID" 2>/dev/null || true; fi
  rm -rf "$DEMO"
}
trap cleanup EXIT

step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

step "taxiway's own registry on loopback: an org, a push token, taxiway login"
PORT=$("$PY" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
taxiway registry org create demo --root "$DEMO/registry"
TOKEN=$(taxiway registry token create --org demo --scope push --expires 1d --root "$DEMO/registry")
taxiway registry serve --listen "127.0.0.1:$PORT" --root "$DEMO/registry" >"$DEMO/registry.log" 2>&1 &
REG_PID=$!
for _ in $(seq 100); do curl -sS -o /dev/null "http://127.0.0.1:$PORT/v2/" 2>/dev/null && break; sleep 0.1; done
echo "taxiway registry listening on 127.0.0.1:$PORT (org demo; names are stored as demo/<name>)"
echo "$TOKEN" | taxiway login "127.0.0.1:$PORT" -u demo --password-stdin

step "Build a small busybox-static image offline and push it with skopeo"
"$PY" - "$DEMO/layout" <<'EOF'
import sys
sys.path.insert(0, "tests")
from pathlib import Path
from helpers.images import write_fixture_image
write_fixture_image(Path(sys.argv[1]), "demo")
EOF
IMAGE="127.0.0.1:$PORT/demo/busybox:1.0"
skopeo copy --quiet --dest-tls-verify=false --dest-creds "demo:$TOKEN" "oci:$DEMO/layout:demo" "docker://$IMAGE"
echo "pushed $IMAGE"

step "taxiway pull $IMAGE"
taxiway pull "$IMAGE"

step "taxiway images"
taxiway images

step "taxiway image inspect $IMAGE"
taxiway image inspect "$IMAGE"

step "skopeo reads taxiway's store (a standard OCI layout)"
skopeo inspect "oci:$TAXIWAY_HOME/store:$IMAGE" | "$PY" -c 'import json,sys; d=json.load(sys.stdin); print("skopeo sees", d["Digest"], "with", len(d["Layers"]), "layers")'

step "taxiway image export $IMAGE rootfs"
taxiway image export "$IMAGE" "$DEMO/rootfs"
echo "\$ rootfs/bin/busybox echo ..."
"$DEMO/rootfs/bin/busybox" echo "hello from a busybox unpacked by taxiway"

if "$PY" -c 'import taxiway.oci.scan' 2>/dev/null; then
  step "taxiway image scan $IMAGE (files hidden by later layers)"
  taxiway image scan "$IMAGE" || true
fi

step "taxiway tag + push to another repository (blobs are mounted, not re-uploaded)"
COPY="127.0.0.1:$PORT/demo/copy:1.0"
taxiway tag "$IMAGE" "$COPY"
taxiway push "$COPY"
skopeo inspect --tls-verify=false --creds "demo:$TOKEN" "docker://$COPY" | "$PY" -c 'import json,sys; d=json.load(sys.stdin); print("the registry has", d["Name"], d["Digest"])'

step "taxiway run $IMAGE (a machine: namespaces, cgroups, overlay snapshot, tini as PID 1)"
taxiway run --rm "$IMAGE" echo hello from a taxiway machine
taxiway run --rm --memory 64m --pids-limit 64 "$IMAGE" sh -c 'echo "inside: pid $$, host $(hostname), $(ls /proc | grep -c "^[0-9]") processes visible"'

step "taxiway run --isolation vm $IMAGE (a QEMU micro-VM; KVM where it works, else TCG emulation)"
taxiway run --rm --isolation vm "$IMAGE" echo hello from a taxiway machine
VM=$(taxiway run -d --isolation vm "$IMAGE" sleep 600 2>/dev/null)
taxiway machines exec "$VM" sh -c 'echo "machines exec into the micro-VM: kernel $(uname -r), PID 1 is $(cat /proc/1/comm)"'
taxiway machines rm -f "$VM" >/dev/null

step "Done"
echo "registry stopped, demo state removed ($DEMO)"
