"""What a source hands to the rest of imagefs: an image as plain data.

Sources (``imagefs.sources``) resolve a user's SOURCE argument to an
:class:`Image`; everything downstream (layer scanning, overlay merge, FUSE)
works only from these frozen dataclasses.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Protocol

from imagefs.digest import Digest
from imagefs.errors import BlobError


class BlobFeed(Protocol):
    """A blob file that is still being written (a registry download in progress).

    Lets the layer pass start on the first bytes instead of after the
    download: readers call :meth:`BlobRange.wait_for` before each read.
    """

    def open_fd(self) -> int:
        """A new read-only descriptor on the file (the same inode once it is complete)."""
        ...

    def wait_for(self, end: int) -> None:
        """Block until bytes ``[0, end)`` of the file are written; raise if the download failed."""
        ...

    def wait_verified(self) -> None:
        """Block until the whole file is written and its digest checked; raise if not."""
        ...


class BlobOpener(Protocol):
    """Opens a blob file some other way than ``os.open`` of its path.

    Host stores (containerd's content store) are read through
    ``imagefs.layers.beneath``, which never follows a symlink inside the store.
    """

    def open_fd(self) -> int:
        """A new read-only descriptor on the blob file; the caller closes it."""
        ...


class BlobAssembly(Protocol):
    """A blob that is no file's byte range but rebuilt from pieces.

    A layer in podman's or Docker's store exists only extracted, plus its
    tar-split record; :class:`imagefs.layers.rebuilt.RebuiltTar` rebuilds the
    exact tar from both. Readers in ``imagefs.layers`` read such a blob
    through it instead of ``open_fd``.
    """

    @property
    def size(self) -> int:
        """The rebuilt blob's length in bytes."""
        ...

    def identity(self) -> list[int | str]:
        """What makes it "the same blob we verified" (cf. layers.index.blob_identity)."""
        ...

    @property
    def cacheable(self) -> bool:
        """False when it may be served though it differs from its digest (--allow-modified):
        nothing derived from it may then be cached under that digest."""
        ...


@dataclass(frozen=True, slots=True)
class BlobRange:
    """A blob stored as a byte range of a local file.

    Layers inside a ``docker save`` tarball are read in place: ``path`` is the
    outer tar and ``offset``/``length`` locate the member's data. For a blob
    stored as its own file, ``offset`` is 0 and ``length`` its size.
    ``feed`` is set while the file is still being downloaded (see BlobFeed);
    ``opener``, when the file must be opened another way (see BlobOpener);
    ``assembly``, for a blob rebuilt from pieces (see BlobAssembly): then
    ``path`` only names it in messages, and there is no file to open.
    """

    path: str
    offset: int
    length: int
    feed: BlobFeed | None = field(default=None, compare=False, hash=False, repr=False)
    opener: BlobOpener | None = field(default=None, compare=False, hash=False, repr=False)
    assembly: BlobAssembly | None = field(default=None, compare=False, hash=False, repr=False)

    def open_fd(self) -> int:
        """Open the underlying file read-only; the caller closes the descriptor."""
        if self.assembly is not None:
            # A rebuilt blob has no file: opening ``path`` would read the
            # tar-split record as if it were the layer.
            raise BlobError(f"{self.path}: a rebuilt layer, read through its assembly")
        if self.feed is not None:
            return self.feed.open_fd()
        if self.opener is not None:
            return self.opener.open_fd()
        return os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)

    def stat(self) -> os.stat_result:
        """The file's status, reached the way :meth:`open_fd` reaches it."""
        if self.opener is None:
            return os.stat(self.path)
        fd = self.opener.open_fd()
        try:
            return os.fstat(fd)
        finally:
            os.close(fd)

    def wait_for(self, end: int) -> None:
        """Block until the range's bytes ``[0, end)`` exist (only a download waits)."""
        if self.feed is not None:
            self.feed.wait_for(self.offset + min(end, self.length))


@dataclass(frozen=True, slots=True)
class Platform:
    """An OCI platform (image-index ``platform`` object)."""

    os: str
    architecture: str
    variant: str = ""

    def __str__(self) -> str:
        base = f"{self.os}/{self.architecture}"
        return f"{base}/{self.variant}" if self.variant else base


@dataclass(frozen=True, slots=True)
class Descriptor:
    """An OCI content descriptor (``mediaType``, ``digest``, ``size``)."""

    media_type: str
    digest: Digest
    size: int
    annotations: tuple[tuple[str, str], ...] = ()
    platform: Platform | None = None


@dataclass(frozen=True, slots=True)
class Layer:
    """One layer of an image: its descriptor and where its bytes are.

    ``descriptor.digest`` is the digest of the bytes in ``blob`` (for legacy
    ``docker save`` layers, which have no compressed digest, it is the diff_id:
    the digest of the uncompressed tar, which is what ``blob`` holds).
    ``diff_id`` is the config's ``rootfs.diff_ids`` entry, or None if unknown.

    ``verify_diff_id``: the diff_id is (also) this layer's trust anchor, so
    the layer's one pass checks it over the *uncompressed* stream as well as
    the descriptor digest over the blob. That is a ``docker save`` archive's
    chain (config -> ``rootfs.diff_ids`` -> the uncompressed tars), where a
    compressed layer (go-containerregistry tarballs: crane, kaniko, ko, jib)
    has no digest a manifest vouches for. Registries and OCI layouts vouch
    for the compressed blob through the verified manifest instead.
    """

    descriptor: Descriptor
    blob: BlobRange
    diff_id: Digest | None = None
    verify_diff_id: bool = False


@dataclass(frozen=True, slots=True)
class Image:
    """A resolved image: config and ordered layers (base first)."""

    source: str  # what the user named, for messages
    transport: str  # "oci", "oci-archive", "docker-archive"
    manifest_digest: Digest | None  # None when the source has no manifest blob (legacy save)
    config_digest: Digest
    config: dict[str, Any] = field(hash=False, compare=False)
    layers: tuple[Layer, ...] = ()
    platform: Platform | None = None
