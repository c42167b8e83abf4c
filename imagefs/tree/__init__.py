"""The image's tree: layers merged into one file system, and its contents.

The OCI overlay merge (whiteouts, opaque directories, hardlinks) of the
layers' entries, the frozen in-memory tree and the packed tree persisted in
the cache, building and loading the tree of an image (scan every layer once,
merge, map), and the content reader that serves file bytes from the layers.

May use: ``imagefs.layers`` and the shared base. Never ``sources``,
``registry``, ``forensics`` or ``daemon``; an :class:`~imagefs.image.Image`
arrives already resolved.
"""
