"""The hostile-image corpus (see :mod:`tests.hostile.corpus` and SECURITY.md)."""
