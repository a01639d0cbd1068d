#!/usr/bin/env bash
# make demo: the main job on embedded defaults, on a fresh machine.
#
# Start taxiway's own multi-tenant registry on loopback (free port) with an org
# and a push token, push a small real busybox-static image to it with skopeo,
# then pull, list, inspect, export, scan, push and run it with taxiway. The
# registry is stopped at the end. Then the platform: `taxiway up -d`, `launch`
# of examples/static (built offline by the builder), a request through the
# edge, a one-line change deployed under a request loop (0 failed requests),
# status, releases, logs, and `taxiway down`. Everything lives in a throwaway
# $TAXIWAY_HOME, so the demo never touches your store, and nothing of it keeps
# running: the platform is stopped and the demo's machines are destroyed.
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
PATH="$REPO/.venv/bin:$PATH"
PY="$REPO/.venv/bin/python"

DEMO=$(mktemp -d "${TMPDIR:-/tmp}/taxiway-demo.XXXXXX")
export TAXIWAY_HOME="$DEMO/home" TAXIWAY_CONFIG="$DEMO/config"
REG_PID="" LOOP_PID="" UP=""
cleanup() {
  if [ -n "$LOOP_PID" ]; then kill "$LOOP_PID" 2>/dev/null || true; wait "$LOOP_PID" 2>/dev/null || true; fi
  if [ -n "$REG_PID" ]; then kill "$REG_PID" 2>/dev/null || true; wait "$REG_PID" 2>/dev/null || true; fi
  if [ -n "$UP" ]; then
    # The platform never stops machines on `down`: stop it, then destroy what the demo's home still runs.
    taxiway down >/dev/null 2>&1 || true
    "$PY" -c 'from taxiway import machines
for m in machines.all_machines(): machines.destroy(m, force=True)' 2>/dev/null || true
    # the private network's namespace files (the fabric, each machine's) are mounts: release them
    "$PY" -c 'import os; from taxiway.platform import fabric; fabric.release_all(os.environ["TAXIWAY_HOME"])' \
      2>/dev/null || true
  fi
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

step "The platform: taxiway up -d (nats-server with JetStream, API, host agent, registry, edge, egress, CA)"
UP=1
taxiway up -d
taxiway platform status

step "taxiway launch: detect examples/static, write taxiway.toml, build offline, push, first deploy"
cp -r examples/static "$DEMO/site"
cd "$DEMO/site"
taxiway launch --name site
echo "\$ cat taxiway.toml (excerpt)"
sed -n '1,3p;/^\[http_service\]/,/^internal_port/p' taxiway.toml
URL=$(taxiway open)
EDGE_PORT=${URL##*:}; EDGE_PORT=${EDGE_PORT%/}
# The HTTPS URL's certificate comes from the platform's own CA: curl trusts its root for the demo.
CA_ROOT=$("$PY" -c 'import json, os; print(json.load(open(os.environ["TAXIWAY_HOME"] + "/platform/up.json"))["ca"])')/root.pem
curl() { command curl --cacert "$CA_ROOT" "$@"; }

step "curl $URL (through the edge: Host site.localhost routes to the app's machines)"
curl -sS --fail "$URL" | grep -o '<h1>.*</h1>'

step "A one-line change, then taxiway deploy (rolling) while a request loop runs"
sed -i 's/hello from a static site/hello again from a static site/' public/index.html
echo "\$ grep h1 public/index.html"; grep -o '<h1>.*</h1>' public/index.html
# One request after another through the edge for as long as the deploy runs; every answer counted.
: >"$DEMO/loop.ok"; : >"$DEMO/loop.failed"
( while [ ! -e "$DEMO/loop.stop" ]; do
    if curl -sS --fail -o /dev/null --max-time 10 "$URL" 2>>"$DEMO/loop.err"; then echo >>"$DEMO/loop.ok"; else echo >>"$DEMO/loop.failed"; fi
  done ) &
LOOP_PID=$!
for _ in $(seq 100); do [ -s "$DEMO/loop.ok" ] && break; sleep 0.1; done
START=$(date +%s%N)
taxiway deploy
END=$(date +%s%N)
touch "$DEMO/loop.stop"; wait "$LOOP_PID"; LOOP_PID=""
OK=$(wc -l <"$DEMO/loop.ok"); FAILED=$(wc -l <"$DEMO/loop.failed")
MS=$(( (END - START) / 1000000 ))
printf 'deploy took %d.%d s (build, push, the new machine healthy, the old one drained and stopped)\n' $((MS / 1000)) $((MS % 1000 / 100))
echo "requests during the deploy: $((OK + FAILED)), failed: $FAILED"
if [ "$FAILED" -ne 0 ]; then echo "a zero-downtime deploy must not fail requests:"; head -5 "$DEMO/loop.err"; exit 1; fi
curl -sS --fail "$URL" | grep -o '<h1>.*</h1>'

step "taxiway status"
taxiway status

step "taxiway releases"
taxiway releases

step "taxiway logs (the newest lines)"
taxiway logs | tail -n 4

step "taxiway apps destroy site; taxiway down"
cd "$REPO"
taxiway apps destroy site -y
taxiway down
UP=""
LEFT=$(taxiway machines ls --json | "$PY" -c 'import json,sys; print(len(json.load(sys.stdin)))')
echo "machines left in the demo's home: $LEFT"
[ "$LEFT" -eq 0 ]

step "Done"
echo "registry and platform stopped, machines destroyed, demo state removed ($DEMO)"
