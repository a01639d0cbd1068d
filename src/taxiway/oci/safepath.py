"""The public name of the in-root path resolver: the unpacker's and the machines' (mount points).

The code lives in :mod:`taxiway.oci._safepath` (with its CVE replays and property
tests); every other module, in ``taxiway.oci`` too, imports it from here:
:class:`RootFS` (resolve a path inside a root, as a chroot would, with file
descriptors), :func:`clean` (split a path into parts that never leave the root),
:func:`rmtree_at` and :func:`openat2_available`.
"""

from taxiway.oci._safepath import RootFS, clean, openat2_available, rmtree_at

__all__ = ["RootFS", "clean", "openat2_available", "rmtree_at"]
