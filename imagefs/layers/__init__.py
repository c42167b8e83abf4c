"""One layer on its own: bytes in, tar entries and random access out.

Compression detection, the single digest-checked pass over a layer blob, the
tar header scanner (:mod:`~imagefs.layers.tarscan`, yielding
:class:`~imagefs.layers.entry.TarEntry`), random access at uncompressed
offsets (plain ``pread``, gzip checkpoints, zstd frames) and the per-layer
index cache. Nothing here knows about other layers or the merged tree.

May use: the shared base (``imagefs.errors``, ``image``, ``cachedir``,
``progress``). Never ``tree``, ``sources``, ``registry``, ``forensics`` or
``daemon`` (checked by import-linter, see ``pyproject.toml``).
"""
