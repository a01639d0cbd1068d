"""OCI and Docker media types, and which kind of object each names."""

OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER = "application/vnd.oci.image.layer.v1.tar"
OCI_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
OCI_LAYER_ZSTD = "application/vnd.oci.image.layer.v1.tar+zstd"
OCI_LAYER_ND = "application/vnd.oci.image.layer.nondistributable.v1.tar"
OCI_LAYER_ND_GZIP = "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip"
OCI_LAYER_ND_ZSTD = "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd"
OCI_EMPTY = "application/vnd.oci.empty.v1+json"

DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_MANIFEST_V1 = "application/vnd.docker.distribution.manifest.v1+json"
DOCKER_MANIFEST_V1_SIGNED = "application/vnd.docker.distribution.manifest.v1+prettyjws"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
DOCKER_LAYER = "application/vnd.docker.image.rootfs.diff.tar.gzip"
DOCKER_FOREIGN_LAYER = "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip"

INDEX_TYPES = frozenset({OCI_INDEX, DOCKER_LIST})
MANIFEST_TYPES = frozenset({OCI_MANIFEST, DOCKER_MANIFEST})
SCHEMA1_TYPES = frozenset({DOCKER_MANIFEST_V1, DOCKER_MANIFEST_V1_SIGNED})

#: What clients send in Accept when fetching a manifest by reference.
MANIFEST_ACCEPT = ", ".join([OCI_INDEX, OCI_MANIFEST, DOCKER_LIST, DOCKER_MANIFEST])

NONDISTRIBUTABLE = frozenset({OCI_LAYER_ND, OCI_LAYER_ND_GZIP, OCI_LAYER_ND_ZSTD, DOCKER_FOREIGN_LAYER})


def layer_compression(media_type: str) -> str:
    """'gzip', 'zstd' or 'none' for a layer media type (unknown suffixes: by suffix)."""
    if media_type in (DOCKER_LAYER, DOCKER_FOREIGN_LAYER) or media_type.endswith("+gzip") or media_type.endswith(".gzip"):
        return "gzip"
    if media_type.endswith("+zstd"):
        return "zstd"
    return "none"


def is_layer(media_type: str) -> bool:
    return media_type.startswith("application/vnd.oci.image.layer.") or media_type.startswith(
        "application/vnd.docker.image.rootfs."
    )
