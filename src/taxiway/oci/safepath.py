"""The public name of the in-root path resolver other parts use (the machines' mount points).

The code lives in :mod:`taxiway.oci._safepath` (the unpacker's, with its CVE
replays and property tests); this module only names what is meant for use
outside ``taxiway.oci``: :class:`RootFS` (resolve a path inside a root, as a
chroot would, with file descriptors), :func:`clean` (split a path into parts
that never leave the root), :func:`rmtree_at` and :func:`openat2_available`.
"""

from taxiway.oci._safepath import RootFS, clean, openat2_available, rmtree_at

__all__ = ["RootFS", "clean", "openat2_available", "rmtree_at"]
