"""The image model: references, digests, descriptors, manifests, the client and the store."""
