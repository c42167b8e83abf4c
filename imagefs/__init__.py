"""imagefs: mount container images read-only with FUSE.

The package's folders follow the data flow; dependencies point down, and
``lint-imports`` checks it (the contract is in ``pyproject.toml``)::

    cli                  the command line (and mount(8)'s SOURCE MNT -o form)
     └─ daemon/          pyfuse3 Operations (thin), mount lifecycle, -o options,
        │                mount table, sd_notify, logs: the only pyfuse3 user
        └─ forensics/    inspect, which, diff, history, provenance, --layers views
           └─ registry/  distribution client, auth, pulls, the blob store
              └─ sources/  local image shapes (OCI layout, archives) -> Image
                 └─ tree/    overlay merge, frozen and packed trees, building
                    │        and loading an image's tree, the content reader
                    └─ layers/  one layer: compression, digest-checked pass,
                                tar scan, per-layer index, random access
    cachedir, image, progress, reference, errors    shared by all of the above
"""

__version__ = "0.1.0"
