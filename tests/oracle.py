"""The test oracle: ``umoci unpack`` of an image, snapshots of trees, comparison.

A mounted imagefs tree is checked by snapshotting it and the umoci-unpacked
rootfs of the same image path by path (:func:`snapshot`), then listing every
difference (:func:`compare`).

What umoci 0.4.7 does (measured here, as root, on ext4; see test_builder.py):

- mtimes: files, symlinks, devices and FIFOs get the tar mtime with its
  nanoseconds (PAX). Directories with an entry get theirs, and umoci restores
  it after writing or whiting out a child, even in a later layer. Two kinds of
  directory mtime are not image data, so :func:`umoci_oracle` marks them
  unknown (``None``) and :func:`compare` skips them: directories umoci creates
  because a deeper path implies them get the time of the unpack, and so does
  a directory in which umoci creates such an implied directory (it does not
  restore that parent's mtime); and the root, when no layer has a ``./``
  entry, keeps umoci's mtime 0.
- the root entry ``./``: mode, owner and mtime are applied.
- implied directories: mode 0755, owner 0:0.
- xattrs: ``user.*``, ``trusted.*`` and ``security.*`` are kept (on symlinks
  too, where the kernel allows: never ``user.*``), except
  ``security.selinux``, which umoci drops with a warning: keep it out of
  images checked against umoci.
- hardlinks share an inode; whiting out the link target in a later layer
  keeps the other links (nlink goes down).
- GNU *old-style* sparse members (typeflag ``S``) make umoci fail; PAX sparse
  members are unpacked (holes as zeros).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import stat
import struct
import tarfile
import tempfile
import time
import zlib
from collections import defaultdict
from collections.abc import Collection, Iterator
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

import zstandard

from tests import builder
from tests.engines import run

_TYPES = {
    stat.S_IFREG: "file",
    stat.S_IFDIR: "dir",
    stat.S_IFLNK: "symlink",
    stat.S_IFCHR: "char",
    stat.S_IFBLK: "block",
    stat.S_IFIFO: "fifo",
    stat.S_IFSOCK: "socket",
}


@dataclass(frozen=True)
class Record:
    """What one path looks like, as far as an image can say.

    ``sha256`` is set for files, ``size`` for files and symlinks (the target's
    length: tools size readlink buffers by it), ``target`` for symlinks,
    ``rdev`` (major, minor) for devices. ``links`` is the sorted tuple of all
    paths in the tree sharing this path's inode, set only when there are
    several, so trees compare by hardlink *grouping*, not inode numbers.
    ``mtime_ns`` is ``None`` when unknown (see the module docstring).
    """

    type: str
    mode: int  # S_IMODE: permissions plus setuid/setgid/sticky
    uid: int
    gid: int
    mtime_ns: int | None
    nlink: int
    size: int | None = None
    sha256: str | None = None
    target: str | None = None
    rdev: tuple[int, int] | None = None
    xattrs: tuple[tuple[str, bytes], ...] = ()
    links: tuple[str, ...] | None = None


FIELDS = tuple(f.name for f in fields(Record))

# Not compared unless asked: a directory's st_nlink is a file-system convention
# (ext4 counts subdirectories, other file systems report 1), not image data.
DEFAULT_IGNORE: frozenset[str] = frozenset({"dir.nlink"})


@dataclass(frozen=True)
class Oracle:
    """An image unpacked by umoci, and the snapshot tests compare against."""

    rootfs: Path
    records: dict[str, Record]


# --------------------------------------------------------------------------- umoci


def umoci_unpack(layout: Path, tag: str, dest: Path) -> Path:
    """``umoci unpack`` ``layout:tag`` into the bundle ``dest``; return its rootfs.

    umoci 0.4.7 unpacks only gzip layers, so other images go through a gzip
    copy first. Run as root: rootless umoci loses owners and device nodes.
    Any warning fails: umoci warns when it drops something (an xattr such as
    ``security.selinux``), and then it is no oracle for that image.
    """
    with tempfile.TemporaryDirectory(prefix="gzip-", dir=dest.parent) as tmp:
        if set(builder.layer_compressions(layout, tag)) != {"gzip"}:
            layout = builder.to_gzip_layout(layout, tag, Path(tmp, "layout"))
        result = run(["umoci", "unpack", "--image", f"{layout}:{tag}", str(dest)])
    warnings = result.stderr.decode(errors="replace").strip()
    if warnings:
        raise RuntimeError(f"umoci unpack {layout}:{tag} warned, so it is no oracle: {warnings}")
    return dest / "rootfs"


def umoci_oracle(layout: Path, tag: str, dest: Path) -> Oracle:
    """Unpack with umoci and snapshot, marking mtimes umoci made up as unknown."""
    started = time.time_ns()
    rootfs = umoci_unpack(layout, tag, dest)
    records = snapshot(rootfs)
    made_up = unpack_stamped_dirs(records, started)
    if not has_root_entry(layout, tag):
        made_up.add("")  # umoci leaves the bundle's root at mtime 0
    return Oracle(rootfs, forget_mtimes(records, made_up))


def unpack_stamped_dirs(records: dict[str, Record], started_ns: int) -> set[str]:
    """Directories whose mtime umoci set to the time of the unpack.

    umoci creates implied directories with the current time and does not
    restore the mtime of a directory it creates one in. Every mtime an image
    holds lies before the unpack started (crafted images use fixed past times;
    umoci_build waits out its rounding), so these are the ones at or after it.
    """
    return {
        path
        for path, record in records.items()
        if record.type == "dir" and record.mtime_ns is not None and record.mtime_ns >= started_ns
    }


def forget_mtimes(records: dict[str, Record], paths: Collection[str]) -> dict[str, Record]:
    return {
        path: replace(record, mtime_ns=None) if path in paths else record
        for path, record in records.items()
    }


def has_root_entry(layout: Path, tag: str) -> bool:
    """Whether any layer has an entry for the root itself (``.``, ``./``, ``/``)."""
    for tar in builder.layer_tars(layout, tag):
        with tarfile.open(fileobj=io.BytesIO(tar)) as tf:
            if any(not _components(name) for name in tf.getnames()):
                return True
    return False


def _components(name: str) -> list[str]:
    return [part for part in name.split("/") if part not in ("", ".")]


# --------------------------------------------------------------------------- snapshot


def snapshot(root: Path) -> dict[str, Record]:
    """Describe every path under ``root`` (``""`` is root), never following symlinks."""
    records: dict[str, Record] = {}
    inodes: dict[tuple[int, int], list[str]] = defaultdict(list)
    for path, st in _walk(root):
        records[path] = _record(root / path if path else root, st)
        if not stat.S_ISDIR(st.st_mode) and st.st_nlink > 1:
            inodes[st.st_dev, st.st_ino].append(path)
    for paths in inodes.values():
        if len(paths) > 1:
            group = tuple(sorted(paths))
            for path in paths:
                records[path] = replace(records[path], links=group)
    return records


def _walk(root: Path) -> Iterator[tuple[str, os.stat_result]]:
    yield "", os.lstat(root)
    pending = [""]
    while pending:
        directory = pending.pop()
        with os.scandir(root / directory if directory else root) as entries:
            for entry in entries:
                path = f"{directory}/{entry.name}" if directory else entry.name
                st = entry.stat(follow_symlinks=False)
                yield path, st
                if stat.S_ISDIR(st.st_mode):
                    pending.append(path)


def _record(full: Path, st: os.stat_result) -> Record:
    kind = _TYPES.get(stat.S_IFMT(st.st_mode), "unknown")
    record = Record(
        type=kind,
        mode=stat.S_IMODE(st.st_mode),
        uid=st.st_uid,
        gid=st.st_gid,
        mtime_ns=st.st_mtime_ns,
        nlink=st.st_nlink,
        xattrs=_xattrs(full),
    )
    if kind == "file":
        return replace(record, size=st.st_size, sha256=_sha256(full))
    if kind == "symlink":
        return replace(record, size=st.st_size, target=os.readlink(full))
    if kind in ("char", "block"):
        return replace(record, rdev=(os.major(st.st_rdev), os.minor(st.st_rdev)))
    return record


def _xattrs(full: Path) -> tuple[tuple[str, bytes], ...]:
    names = os.listxattr(full, follow_symlinks=False)
    return tuple(sorted((name, os.getxattr(full, name, follow_symlinks=False)) for name in names))


def _sha256(full: Path) -> str:
    digest = hashlib.sha256()
    with open(full, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


# --------------------------------------------------------------------------- unchanged

# (mode, size, mtime_ns, ctime_ns, inode, sha256 of a file / a symlink's target / "")
State = tuple[int, int, int, int, int, str]


def tree_state(root: Path, *, contents: bool = True) -> dict[str, State]:
    """Every path under ``root`` (``""`` is ``root``), never following a symlink.

    What reading a store must leave alone (nobody but the clock sets a
    ctime), and what a test session must leave alone on the host. Without
    ``contents`` files are not read (the ctime and mtime still show a write).
    Empty if ``root`` does not exist; a directory that vanishes meanwhile is
    skipped (another process may be changing the tree).
    """
    state: dict[str, State] = {}
    try:
        state[""] = _state(root, os.lstat(root), contents)
    except FileNotFoundError:
        return state
    pending = [""] if stat.S_ISDIR(state[""][0]) else []
    while pending:
        directory = pending.pop()
        try:
            with os.scandir(root / directory if directory else root) as entries:
                found = [(entry.name, entry.stat(follow_symlinks=False)) for entry in entries]
        except (FileNotFoundError, NotADirectoryError):
            continue
        for name, st in found:
            path = f"{directory}/{name}" if directory else name
            try:
                state[path] = _state(root / path, st, contents)
            except FileNotFoundError:
                continue
            if stat.S_ISDIR(st.st_mode):
                pending.append(path)
    return state


def _state(full: Path, st: os.stat_result, contents: bool) -> State:
    what = ""
    if stat.S_ISLNK(st.st_mode):
        what = os.readlink(full)
    elif contents and stat.S_ISREG(st.st_mode):
        what = _sha256(full)
    return (st.st_mode, st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, what)


def state_changes(before: dict[str, State], after: dict[str, State]) -> list[str]:
    """What differs between two :func:`tree_state` results, one line per path."""
    changes = [f"removed {path or '.'}" for path in sorted(before.keys() - after.keys())]
    changes += [f"added {path or '.'}" for path in sorted(after.keys() - before.keys())]
    changes += [
        f"changed {path or '.'}"
        for path in sorted(before.keys() & after.keys())
        if before[path] != after[path]
    ]
    return changes


# --------------------------------------------------------------------------- compare


def compare(
    expected: dict[str, Record],
    actual: dict[str, Record],
    *,
    ignore: Collection[str] = DEFAULT_IGNORE,
) -> list[str]:
    """Every difference between two snapshots, one readable line each.

    ``ignore`` names fields not to compare: ``"mtime_ns"`` for every type, or
    ``"dir.mtime_ns"``-style ``type.field`` for one type; ``"xattrs"``,
    ``"links"`` and so on likewise (:data:`FIELDS`). An expected ``mtime_ns``
    of ``None`` (unknown) is never compared. The default ignores only
    directory link counts (:data:`DEFAULT_IGNORE`).
    """
    unknown = [name for name in ignore if name.rpartition(".")[2] not in FIELDS]
    if unknown:
        raise ValueError(f"unknown fields to ignore: {unknown}")
    problems = [f"{_show(path)}: missing" for path in sorted(expected.keys() - actual.keys())]
    problems += [f"{_show(path)}: unexpected" for path in sorted(actual.keys() - expected.keys())]
    for path in sorted(expected.keys() & actual.keys()):
        problems += _record_differences(path, expected[path], actual[path], ignore)
    return problems


def _record_differences(
    path: str, expected: Record, actual: Record, ignore: Collection[str]
) -> list[str]:
    if expected.type != actual.type:
        return [f"{_show(path)}: type {expected.type} != {actual.type}"]
    problems = []
    for name in FIELDS:
        if name in ignore or f"{expected.type}.{name}" in ignore:
            continue
        want, got = getattr(expected, name), getattr(actual, name)
        if name == "mtime_ns" and want is None:
            continue
        if want != got:
            problems.append(f"{_show(path)}: {name} {_format(name, want)} != {_format(name, got)}")
    return problems


def _show(path: str) -> str:
    return path or "<root>"


def _format(name: str, value: object) -> str:
    if name == "mode" and isinstance(value, int):
        return f"{value:04o}"
    if name == "xattrs" and isinstance(value, tuple):
        return "{" + ", ".join(f"{key}={val!r}" for key, val in value) + "}"
    return repr(value) if isinstance(value, str) else str(value)


# -- eStargz and zstd:chunked TOCs, read without imagefs (zlib, zstandard, tarfile, json)


def toc_json(blob: bytes) -> dict[str, Any]:
    """The TOC of an eStargz or zstd:chunked blob, read without imagefs.

    eStargz: the footer's hex offset, the gzip member there, the tar in it
    (``tarfile``). zstd:chunked: the 40- or 64-byte footer in the last
    skippable frame (offset, compressed length, uncompressed length).
    """
    if blob.startswith(b"\x1f\x8b"):
        offset = int(blob[-51:][16:32], 16)
        member = zlib.decompressobj(31).decompress(blob[offset:-51])
        with tarfile.open(fileobj=io.BytesIO(member)) as tar:
            extracted = tar.extractfile("stargz.index.json")
            assert extracted is not None
            document: dict[str, Any] = json.loads(extracted.read())
            return document
    # The footer frame: 8-byte skippable header, then 40 or 64 bytes.
    short_header = struct.unpack_from("<II", blob, len(blob) - 48)
    payload = (
        blob[-40:] if short_header[0] >> 4 == 0x184D2A5 and short_header[1] == 40 else blob[-64:]
    )
    offset, length, uncompressed = struct.unpack_from("<QQQ", payload)
    raw = zstandard.ZstdDecompressor().decompress(
        blob[offset : offset + length], max_output_size=uncompressed
    )
    document = json.loads(raw)
    return document


def toc_json_bytes(blob: bytes) -> bytes:
    """The TOC JSON of an eStargz blob, exactly as stored (its digest is toc.digest)."""
    offset = int(blob[-51:][16:32], 16)
    member = zlib.decompressobj(31).decompress(blob[offset:-51])
    with tarfile.open(fileobj=io.BytesIO(member)) as tar:
        extracted = tar.extractfile("stargz.index.json")
        assert extracted is not None
        return extracted.read()
