"""Incident response: inspect, which, diff, history, provenance, layer views.

Reads images without mounting them (``inspect``, ``which``, ``diff``) and
builds the extra trees a mount can serve (``--layers``, ``--upto``) and the
provenance behind the hidden ``user.imagefs.*`` xattrs.

May use: ``registry``, ``sources``, ``tree``, ``layers`` and the shared base.
Never ``daemon`` or pyfuse3.
"""
