"""The OCI distribution server: tenants, tokens, storage, GC.

``create_app(root)`` builds the Starlette app; ``taxiway registry serve`` runs it
on uvicorn. Pure cores (paths, manifests, scopes) live in their own modules and
are tested without a server.
"""
