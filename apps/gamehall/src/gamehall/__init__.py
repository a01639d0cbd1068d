"""gamehall: a clustered, real-time, turn-based multiplayer game hall."""

__version__ = "0.1.0"
