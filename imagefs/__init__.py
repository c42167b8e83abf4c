"""imagefs: mount container images read-only with FUSE.

Layering (dependencies point down; only ``fs`` and ``mount`` import pyfuse3)::

    cli
     └─ mount (lifecycle: daemonize, signals, readiness)
         └─ fs (pyfuse3 Operations, thin adapter)
             └─ imagetree (build: sources -> layer scan -> overlay merge)
                 ├─ sources/   (oci layout, docker-archive, oci-archive)
                 ├─ layerio    (compression sniffing, sequential + random access)
                 ├─ tarscan    (tar headers -> TarEntry)
                 ├─ overlay    (OCI changeset rules -> MergedTree)
                 └─ content    (file bytes from layers)
"""

__version__ = "0.1.0"
