"""taxiway: a self-hostable application platform, Docker without Docker."""

__version__ = "0.1.0"
