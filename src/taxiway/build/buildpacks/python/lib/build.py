#!/usr/bin/python3 -IS
"""Dependencies in a venv launch layer (reused while the lock files' hash is unchanged), pip's cache in a cache layer."""
import re
import sys
from pathlib import Path

sys.path.insert(0, "/cnb/buildpacks/_lib")
import cnb  # noqa: E402

app = cnb.app()
layers = cnb.layers_dir()
LOCKS = ("requirements.txt", "pyproject.toml", "setup.py", "setup.cfg", "poetry.lock", "uv.lock")
pyver = "%d.%d.%d" % sys.version_info[:3]
want = cnb.digest_files(*(app / n for n in LOCKS), extra=pyver + ";layout=2")
venv = layers / "venv"

if cnb.layer_metadata("venv").get("hash") == want:
    print(f"python: dependencies unchanged ({want[:12]}), reusing the venv layer")
else:
    cnb.write_layer("pip-cache", cache=True)
    cnb.fresh_layer("venv")
    # No pip inside the venv: the build image's pip installs into it (smaller, faster layer).
    cnb.run(["python3", "-m", "venv", "--without-pip", str(venv)])
    pip = ["python3", "-m", "pip", "--python", str(venv / "bin" / "python"), "install", "--disable-pip-version-check",
           "--no-input", "--no-warn-script-location", "--cache-dir", str(layers / "pip-cache")]
    if (app / "requirements.txt").is_file():
        cnb.run(pip + ["-r", "requirements.txt"], cwd=app)
    elif any((app / n).is_file() for n in ("pyproject.toml", "setup.py")):
        cnb.run(pip + ["."], cwd=app)
    cnb.set_env("venv", "PYTHONUNBUFFERED", "1")
    cnb.set_env("venv", "VIRTUAL_ENV", "/layers/taxiway_python/venv", suffix="override")
    site = next(venv.glob("lib/python*/site-packages"), None)
    servers = [s for s in ("gunicorn", "uvicorn") if site is not None and (site / s).is_dir()]
    cnb.write_layer("venv", launch=True, metadata={"hash": want, "python": pyver, "servers": servers})

if (app / "Procfile").is_file():
    print("python: Procfile present, its processes are used")
    sys.exit(0)

# The default process: gunicorn for a WSGI app, uvicorn for an ASGI app, else python <file>.
servers = cnb.layer_metadata("venv").get("servers", [])
def installed(pkg):
    return pkg in servers

entry = next((n for n in ("app.py", "main.py", "wsgi.py", "asgi.py", "server.py") if (app / n).is_file()), None)
if entry is None:
    print("python: no app.py or main.py and no Procfile, so no default process (add a Procfile)")
    sys.exit(0)
src = (app / entry).read_text(errors="replace")
module = entry[:-3]
m = re.search(r"^(\w+)\s*=\s*(Flask|FastAPI|Starlette|Quart|Litestar|Django\w*|falcon\.\w+)\(", src, re.M)
var = m.group(1) if m else "app"
kind = m.group(2) if m else ""
if kind in ("FastAPI", "Starlette", "Quart", "Litestar") and installed("uvicorn"):
    cmd = f"exec uvicorn {module}:{var} --host 0.0.0.0 --port ${{PORT:-8080}}"
elif kind and installed("gunicorn"):
    cmd = f"exec gunicorn --bind 0.0.0.0:${{PORT:-8080}} --workers ${{WEB_CONCURRENCY:-2}} --access-logfile - {module}:{var}"
else:
    cmd = f"exec python3 {entry}"
print(f"python: web process: {cmd}")
cnb.launch([cnb.shell_process("web", cmd, default=True)])
