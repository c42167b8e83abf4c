"""Errors raised by imagefs, as one documented hierarchy.

Every error carries its context in its message (which file, which blob, what
went wrong), so the CLI can print ``imagefs: <message>`` on one line and exit
non-zero without a traceback::

    ImageFSError                  base of everything imagefs raises on purpose
    ├── UsageError                bad command line or option value
    │   └── InvalidReferenceError an image reference that does not parse
    ├── SourceError               the image source cannot be used
    │   ├── SourceNotFoundError   path / reference / tag / image name absent
    │   ├── ManifestError         manifest, index or config missing or invalid
    │   ├── PlatformError         no manifest for the requested platform
    │   ├── MediaTypeError        a media type imagefs does not understand
    │   ├── NotCachedError        --offline, and the cache lacks the image
    │   ├── CorruptStoreError     a host store's database (containerd's meta.db) is corrupt
    │   └── RegistryError         a registry request failed (after retries)
    │       ├── RegistryAuthError      401: credentials missing or refused
    │       ├── RegistryDeniedError    403: authenticated but not allowed
    │       ├── RegistryNotFoundError  404: repository, tag or blob unknown
    │       ├── RateLimitError         429: too many requests (says when to retry)
    │       └── RegistryUnavailableError  connection, TLS, timeout or 5xx
    ├── BlobError                 a blob cannot be read correctly
    │   ├── BlobMissingError      a referenced blob is absent
    │   └── DigestMismatchError   a blob's content does not match its digest
    │       └── LayerModifiedError  a store's extracted layer was changed on the host
    ├── LayerError                a layer's content is unusable
    │   ├── CompressionError      corrupt/truncated gzip or zstd stream
    │   ├── TarFormatError        corrupt/truncated tar stream
    │   ├── TarSplitError         corrupt/malformed tar-split record of a store layer
    │   └── TocError              eStargz / zstd:chunked TOC malformed or inconsistent
    └── MountError                the mount itself failed (mount point, FUSE)
"""

from __future__ import annotations


class ImageFSError(Exception):
    """Base class for every error imagefs raises deliberately."""


class UsageError(ImageFSError):
    """The command line or an option value is invalid."""


class InvalidReferenceError(UsageError):
    """An image reference (``alpine:3``, ``host:5000/repo@sha256:...``) is malformed."""


class SourceError(ImageFSError):
    """The image source (file, directory, reference) cannot be used."""


class SourceNotFoundError(SourceError):
    """The source path, tag or image name inside a multi-image archive is absent."""


class ManifestError(SourceError):
    """A manifest, index, config or ``manifest.json`` is missing or malformed."""


class PlatformError(SourceError):
    """An index has no manifest for the requested platform; lists those it has."""


class MediaTypeError(SourceError):
    """A descriptor has a media type imagefs does not understand."""


class NotCachedError(SourceNotFoundError):
    """``--offline``: the image (tag, manifest or a blob) is not in the local cache."""


class CorruptStoreError(SourceError):
    """A host image store's own records (containerd's bbolt meta.db) are corrupt or truncated."""


class RegistryError(SourceError):
    """A request to a registry failed; the message names the registry and what was asked."""


class RegistryAuthError(RegistryError):
    """The registry answered 401: credentials are missing, wrong or were refused."""


class RegistryDeniedError(RegistryError):
    """The registry answered 403: the credentials do not grant pulling this repository."""


class RegistryNotFoundError(RegistryError, SourceNotFoundError):
    """The registry answered 404: no such repository, tag, manifest or blob."""


class RateLimitError(RegistryError):
    """The registry answered 429 (rate limit); the message says when to retry."""


class RegistryUnavailableError(RegistryError):
    """The registry cannot be reached: connection, TLS, timeout, or 5xx after retries."""


class BlobError(ImageFSError):
    """A blob cannot be read correctly."""


class BlobMissingError(BlobError):
    """A blob referenced by a manifest is not present in the source."""


class DigestMismatchError(BlobError):
    """A blob's content (or size) does not match the digest that names it."""


class LayerModifiedError(DigestMismatchError):
    """A layer rebuilt from a host store (tar-split + extracted files) differs from the image.

    Files under the layer's directory were changed, added or removed since
    the engine extracted it; the message names the layer and the paths.
    """


class LayerError(ImageFSError):
    """A layer's content cannot be interpreted."""


class CompressionError(LayerError):
    """A gzip or zstd layer stream is corrupt or truncated."""


class TarFormatError(LayerError):
    """A layer's tar stream is corrupt or truncated."""


class TarSplitError(LayerError):
    """A store layer's tar-split record is corrupt, truncated or malformed."""


class TocError(LayerError):
    """A layer's eStargz or zstd:chunked table of contents (or its footer) is malformed,
    too big, or inconsistent (chunks outside the blob or overlapping, sizes not adding
    up, names leaving the root). A TOC whose digest does not match raises
    DigestMismatchError instead."""


class MountError(ImageFSError):
    """Mounting failed: bad or busy mount point, FUSE unavailable, daemon died."""
