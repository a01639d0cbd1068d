"""Shared test helpers: free ports, real servers started on loopback."""
