"""The mount: pyfuse3 adapter, lifecycle, options, mount table, sd_notify, logs.

The only package that imports pyfuse3 (checked by import-linter). The
Operations class is a thin adapter over :mod:`imagefs.tree`; everything it
serves is computed below it.

May use: everything below it (``forensics``, ``registry``, ``sources``,
``tree``, ``layers`` and the shared base); only ``imagefs.cli`` uses it.
"""
