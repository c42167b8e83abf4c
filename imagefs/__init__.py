"""imagefs: mount container images read-only with FUSE.

Layering (dependencies point down; only ``fs`` and ``mount`` import pyfuse3)::

    cli, mountopts                    commands and options (mount(8)'s -o form too)
     └─ mount (lifecycle: fork, readiness pipe, signals; notify, mounttab, logsetup)
         └─ fs (pyfuse3 Operations, thin adapter; provenance xattrs)
             └─ indexer (persisted tree: packedtree; built once by loader)
                 └─ loader (one pass per layer, then merge)
                     ├─ sources/, registry/  SOURCE -> Image (config, layers as byte ranges)
                     ├─ blobstore    content-addressed cache of registry blobs
                     ├─ layerio      compression sniffing, digest check, random access
                     ├─ tarscan      tar headers -> TarEntry
                     ├─ overlay      OCI changeset rules -> Node tree
                     ├─ tree         inode numbers, lookups
                     └─ content      file bytes from layers
    inspect, diff, investigate, views, history   incident-response commands and views
"""

__version__ = "0.1.0"
