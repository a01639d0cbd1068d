"""The OCI distribution server: tenants, tokens, storage, GC.

``create_app(Config(root=...), storage=...)`` builds the Starlette app over a
:class:`~taxiway.registry.storage.Storage` (the filesystem driver by default,
:class:`~taxiway.registry.memory.MemoryStorage` for unit tests); ``taxiway
registry serve`` runs it on uvicorn. Pure cores (paths, manifests, scopes) live
in their own modules and are tested without a server.
"""
