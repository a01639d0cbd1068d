"""Install the dependencies into the venv launch layer (bin/build runs this only when their hash changed)."""
import os
import sys
from pathlib import Path

sys.path.insert(0, "/cnb/buildpacks/_lib")
import cnb  # noqa: E402

app = cnb.app()
layers = cnb.layers_dir()
pyver = ".".join(map(str, sys.version_info[:3]))
want = os.environ["TAXIWAY_DEPS_HASH"]  # computed by bin/build, the one place that defines it
venv = layers / "venv"

cnb.write_layer("pip-cache", cache=True)
cnb.fresh_layer("venv")
# No pip inside the venv: the build image's pip installs into it (smaller, faster layer).
cnb.run(["python3", "-m", "venv", "--without-pip", str(venv)])
pip = ["python3", "-m", "pip", "--python", str(venv / "bin" / "python"), "install", "--disable-pip-version-check",
       "--no-input", "--no-warn-script-location", "--cache-dir", str(layers / "pip-cache")]
locked = next((n for n in ("uv.lock", "poetry.lock") if (app / n).is_file()), None)
if (app / "requirements.txt").is_file():
    cnb.run(pip + ["-r", "requirements.txt"], cwd=app)
elif locked:
    # The lock's pins, installed by pip: neither uv nor Poetry is needed at build time.
    import pylock

    try:
        reqs = (pylock.uv_requirements if locked == "uv.lock" else pylock.poetry_requirements)(app / locked)
    except (ValueError, KeyError) as e:
        cnb.fail(f"cannot read {locked}: {e}")
    print(f"python: {len(reqs)} packages pinned by {locked}")
    pinned = Path("/tmp/taxiway-locked-requirements.txt")
    pinned.write_text("".join(r + "\n" for r in reqs))
    if reqs:
        cnb.run(pip + ["--no-deps", "-r", str(pinned)], cwd=app)
elif any((app / n).is_file() for n in ("pyproject.toml", "setup.py")):
    cnb.run(pip + ["."], cwd=app)
cnb.set_env("venv", "PYTHONUNBUFFERED", "1")
cnb.set_env("venv", "VIRTUAL_ENV", "/layers/taxiway_python/venv", suffix="override")
site = next(venv.glob("lib/python*/site-packages"), None)
servers = [s for s in ("gunicorn", "uvicorn") if site is not None and (site / s).is_dir()]
cnb.write_layer("venv", launch=True, metadata={"hash": want, "python": pyver, "servers": servers})
