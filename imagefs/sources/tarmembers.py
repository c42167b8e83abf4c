"""Index the members of an outer (image archive) tar without extracting it.

``docker save`` tarballs and oci-archives are read in place: one pass over
the tar headers (seeking past member data) records where each member's data
lives, and blobs become byte ranges of the archive file. Symlink members
(skopeo's ``<id>/layer.tar -> ../<diffid>.tar``) and hardlink members are
resolved inside the archive, never on the host file system.
"""

from __future__ import annotations

import enum
import os
import tarfile
from collections import deque
from dataclasses import dataclass

from imagefs.errors import SourceError

# Linux's limit on symlinks followed in one lookup (MAXSYMLINKS).
MAX_LINK_HOPS = 40

# Compressed wrappers seen around archives ("docker save | gzip"): these cannot
# be read in place, so say so instead of "not a tar archive".
_COMPRESSED_MAGIC: tuple[tuple[bytes, str], ...] = (
    (b"\x1f\x8b", "gzip"),
    (b"\x28\xb5\x2f\xfd", "zstd"),
    (b"\xfd7zXZ\x00", "xz"),
    (b"BZh", "bzip2"),
)


class MemberKind(enum.Enum):
    FILE = "file"
    DIRECTORY = "directory"
    SYMLINK = "symlink"
    HARDLINK = "hardlink"
    OTHER = "other"  # devices, FIFOs, sparse files: never a blob


@dataclass(frozen=True, slots=True)
class Member:
    """One tar member: ``offset``/``size`` locate its data in the archive."""

    name: str
    kind: MemberKind
    offset: int
    size: int
    linkname: str = ""


def clean_member_name(name: str) -> str | None:
    """``./blobs//sha256/x`` -> ``blobs/sha256/x``; None for names with ``..``.

    Tools differ in prefixing ``./`` (``tar -C dir -cf x.tar .``) or a leading
    ``/``; both name the same member. A ``..`` component cannot name anything
    inside the archive, so such members are not indexed.
    """
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if ".." in parts:
        return None
    return "/".join(parts)


def _kind(info: tarfile.TarInfo) -> MemberKind:
    if info.issparse():
        return MemberKind.OTHER  # data is not one contiguous range
    if info.isreg():
        return MemberKind.FILE
    if info.isdir():
        return MemberKind.DIRECTORY
    if info.issym():
        return MemberKind.SYMLINK
    if info.islnk():
        return MemberKind.HARDLINK
    return MemberKind.OTHER


class TarMembers:
    """The members of one tar archive, by cleaned name (the last one of a name wins)."""

    def __init__(self, path: str, members: dict[str, Member]) -> None:
        self.path = path
        self._members = members

    @classmethod
    def index(cls, path: str) -> TarMembers:
        """Read every header of the tar at ``path`` (blocks; seeks past data).

        Raises SourceError when the file is not an uncompressed tar or is
        truncated (a member's data runs past the end of the file).
        """
        path = os.path.abspath(path)
        members: dict[str, Member] = {}
        try:
            with open(path, "rb") as f:
                file_size = os.fstat(f.fileno()).st_size
                head = f.read(8)
                for magic, algo in _COMPRESSED_MAGIC:
                    if head.startswith(magic):
                        raise SourceError(
                            f"{path}: {algo}-compressed file; imagefs reads image archives "
                            "in place and needs the uncompressed tar: decompress it first"
                        )
                f.seek(0)
                # "r:" = no compression; the stream is only ever seeked, never extracted.
                with tarfile.open(fileobj=f, mode="r:") as tf:
                    for info in tf:
                        name = clean_member_name(info.name)
                        if name is None or not name:
                            continue
                        kind = _kind(info)
                        if kind is MemberKind.FILE and info.offset_data + info.size > file_size:
                            raise SourceError(
                                f"{path}: truncated tar archive: member {info.name!r} "
                                f"needs {info.offset_data + info.size - file_size} bytes "
                                "past the end of the file"
                            )
                        members[name] = Member(
                            name=name,
                            kind=kind,
                            offset=info.offset_data,
                            size=info.size if kind is MemberKind.FILE else 0,
                            linkname=info.linkname,
                        )
        except tarfile.TarError as exc:
            raise SourceError(f"{path}: not a tar archive ({exc})") from exc
        except OSError as exc:
            raise SourceError(f"{path}: cannot read: {exc.strerror or exc}") from exc
        return cls(path, members)

    def __contains__(self, name: str) -> bool:
        return self.resolve(name) is not None

    def names(self) -> list[str]:
        return list(self._members)

    def resolve(self, name: str) -> Member | None:
        """The regular-file member ``name`` denotes, following links; None if absent.

        Symlinks are resolved component by component relative to the
        directory holding them (absolute targets from the archive root);
        hardlinks name their target from the archive root (tar semantics).
        A path leaving the archive root, a loop, or a non-file is None.
        """
        hops = 0
        pending: deque[str] = deque(name.split("/"))
        resolved: list[str] = []
        while True:
            while pending:
                part = pending.popleft()
                if part in ("", "."):
                    continue
                if part == "..":
                    if not resolved:
                        return None
                    resolved.pop()
                    continue
                member = self._members.get("/".join([*resolved, part]))
                if member is not None and member.kind is MemberKind.SYMLINK:
                    hops += 1
                    if hops > MAX_LINK_HOPS:
                        return None
                    if member.linkname.startswith("/"):
                        resolved = []
                    pending.extendleft(reversed(member.linkname.split("/")))
                    continue
                resolved.append(part)
            member = self._members.get("/".join(resolved))
            if member is None:
                return None
            if member.kind is MemberKind.HARDLINK:
                hops += 1
                if hops > MAX_LINK_HOPS:
                    return None
                pending = deque(member.linkname.split("/"))
                resolved = []
                continue
            return member if member.kind is MemberKind.FILE else None
