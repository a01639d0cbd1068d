"""The Python sample: a Flask app that taxiway's python buildpack runs with gunicorn on $PORT."""
import os

from flask import Flask

app = Flask(__name__)


@app.get("/")
def index():
    return "hello from python on taxiway\n"


@app.get("/healthz")
def healthz():
    return {"ok": True, "port": os.environ.get("PORT")}


if __name__ == "__main__":
    app.run(host="0.0.0.0", port=int(os.environ.get("PORT", "8080")))
