"""Where a source's files live: a directory or the members of an outer tar.

The OCI layout code and the ``docker save`` code name files by their path in
the layout (``index.json``, ``blobs/sha256/<hex>``); a store turns such a name
into a :class:`~imagefs.image.BlobRange` of a local file, so the same code
reads a layout directory and a layout inside a tar.
"""

from __future__ import annotations

import os
import stat
from typing import Protocol

from imagefs.errors import BlobError, ImageFSError, ManifestError
from imagefs.image import BlobRange
from imagefs.sources.tarmembers import TarMembers

# Manifests, indexes, configs and manifest.json above this size are refused:
# real ones are kilobytes, and a hostile one should not exhaust memory.
MAX_JSON_SIZE = 8 * 1024 * 1024


class Store(Protocol):
    """Named files of one source."""

    def locate(self, name: str) -> BlobRange | None:
        """Where the regular file ``name`` is; None if it does not exist."""
        ...

    def where(self, name: str) -> str:
        """How to name ``name`` in a message (a path, or ``archive: member``)."""
        ...


class DirStore:
    """Files under a directory (an OCI image layout)."""

    def __init__(self, root: str) -> None:
        self.root = os.path.abspath(root)

    def locate(self, name: str) -> BlobRange | None:
        # Callers pass fixed names or blobs/<alg>/<hex> built from a validated
        # digest, so the joined path cannot leave the root.
        path = os.path.join(self.root, name)
        try:
            st = os.stat(path)
        except FileNotFoundError:
            return None
        except NotADirectoryError:
            return None
        except OSError as exc:
            raise BlobError(f"{path}: cannot stat: {exc.strerror or exc}") from exc
        if not stat.S_ISREG(st.st_mode):
            return None
        return BlobRange(path, 0, st.st_size)

    def where(self, name: str) -> str:
        return os.path.join(self.root, name)


class TarStore:
    """Members of an outer tar, read in place."""

    def __init__(self, members: TarMembers) -> None:
        self.members = members

    def locate(self, name: str) -> BlobRange | None:
        member = self.members.resolve(name)
        if member is None:
            return None
        return BlobRange(self.members.path, member.offset, member.size)

    def where(self, name: str) -> str:
        return f"{self.members.path}: {name}"


def read_range(rng: BlobRange, where: str, *, limit: int = MAX_JSON_SIZE) -> bytes:
    """Read a whole (small) blob; ManifestError if it exceeds ``limit`` bytes."""
    if rng.length > limit:
        raise ManifestError(
            f"{where}: {rng.length} bytes, refusing to parse a document over "
            f"{limit // (1024 * 1024)} MiB"
        )
    try:
        fd = rng.open_fd()
    except OSError as exc:
        raise BlobError(f"{where}: cannot open: {exc.strerror or exc}") from exc
    try:
        chunks: list[bytes] = []
        done = 0
        while done < rng.length:
            chunk = os.pread(fd, rng.length - done, rng.offset + done)
            if not chunk:
                raise BlobError(f"{where}: file shrank while reading ({done} of {rng.length})")
            chunks.append(chunk)
            done += len(chunk)
        return b"".join(chunks)
    except OSError as exc:
        raise BlobError(f"{where}: cannot read: {exc.strerror or exc}") from exc
    finally:
        os.close(fd)


def read_file(store: Store, name: str, missing: ImageFSError) -> bytes:
    """The whole (small) file ``name`` of ``store``; raises ``missing`` if it is absent."""
    rng = store.locate(name)
    if rng is None:
        raise missing
    return read_range(rng, store.where(name))
