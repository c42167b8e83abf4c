"""Property tests and fuzzing (hypothesis): merge, tar scanner, manifest parsers.

* The merged tree of random layer stacks equals a small reference model of
  the OCI changeset rules (image-spec layer.md), written here from the spec
  and not from imagefs.tree.overlay; a few stacks are also unpacked by umoci.
* The tar scanner, fed mutated archives, yields entries or raises
  TarFormatError, nothing else.
* The manifest, index and config parsers, fed arbitrary JSON, return or
  raise an ImageFSError, nothing else.
* The TOC readers (footers, annotations, TOC JSON, chunks), fed mutated
  eStargz and zstd:chunked blobs and arbitrary TOC JSON, return a TOC that
  keeps its invariants (chunks tile each file, lie in the blob's payload in
  order, names stay inside the root) or raise an ImageFSError, nothing else.

Budgets: ``make test`` runs a few hundred examples per target (seconds);
``make fuzz`` sets ``IMAGEFS_FUZZ_EXAMPLES`` for long runs. Examples are
derandomised in ``make test`` so the suite is repeatable; ``make fuzz``
explores new ones each run.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
from dataclasses import dataclass

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from imagefs.digest import Digest
from imagefs.errors import ImageFSError, TarFormatError, TocError
from imagefs.layers.entry import EntryType, TarEntry
from imagefs.layers.tarscan import scan_tar
from imagefs.layers.toc import (
    TOC_DATA_BASE,
    NotServable,
    Toc,
    TocFormat,
    decode_chunk,
    locate,
    read_toc,
)
from imagefs.layers.toc.jsontoc import parse_entries
from imagefs.layers.toc.locate import TAIL_SIZE
from imagefs.sources.manifest import parse_config, parse_manifest_or_index
from imagefs.tree.merged import freeze
from imagefs.tree.overlay import Node, _clean_slow, clean_path, merge_layers
from tests import builder, toccraft
from tests.needs import require_root, require_tools
from tests.oracle import snapshot, umoci_unpack

EXAMPLES = int(os.environ.get("IMAGEFS_FUZZ_EXAMPLES", "0"))
LONG = EXAMPLES > 0
FUZZ = settings(
    max_examples=EXAMPLES or 200,
    derandomize=not LONG,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

# ----------------------------------------------------------------- model

NAMES = ("a", "b", "c")
DANGLING = "/zz-nowhere"  # symlink target that never exists: never followed


@dataclass(frozen=True)
class Op:
    """One layer entry: kind in file, dir, symlink, hardlink, whiteout, opaque."""

    kind: str
    path: str
    value: str = ""  # file content, dir mode (octal text), hardlink target


paths = st.lists(st.sampled_from(NAMES), min_size=1, max_size=3).map("/".join)
ops = st.one_of(
    st.builds(Op, st.just("file"), paths, st.sampled_from(("x", "y", "z"))),
    st.builds(Op, st.just("dir"), paths, st.sampled_from(("755", "700"))),
    st.builds(Op, st.just("symlink"), paths),
    st.builds(Op, st.just("hardlink"), paths, paths),
    st.builds(Op, st.just("whiteout"), paths),
    st.builds(Op, st.just("opaque"), st.one_of(st.just(""), paths)),
)
stacks = st.lists(st.lists(ops, max_size=8), min_size=1, max_size=4)

Model = dict[str, tuple[str, str]]  # path -> (kind, value): file content, dir mode, target


def _descendants(state: Model, path: str) -> list[str]:
    prefix = path + "/" if path else ""
    return [p for p in state if p.startswith(prefix) and p != path]


def _remove(state: Model, path: str) -> None:
    for p in [path, *_descendants(state, path)]:
        state.pop(p, None)


def _ensure_dirs(state: Model, path: str) -> None:
    """Every ancestor of ``path`` (and ``path``) a directory; anything else is replaced."""
    parts = path.split("/") if path else []
    for depth in range(1, len(parts) + 1):
        here = "/".join(parts[:depth])
        if state.get(here, ("", ""))[0] != "dir":
            _remove(state, here)
            state[here] = ("dir", "755")


def model_merge(layers: list[list[Op]]) -> Model:
    """The OCI rules, applied the obvious way (paths only, no symlinks followed)."""
    state: Model = {}
    for layer in layers:
        # Whiteouts and opaque markers apply first, to lower layers only.
        for op in layer:
            if op.kind == "opaque":
                for p in _descendants(state, op.path):
                    del state[p]
            elif op.kind == "whiteout":
                parent = op.path.rpartition("/")[0]
                if parent == "" or state.get(parent, ("", ""))[0] == "dir":
                    _remove(state, op.path)
        for op in layer:
            if op.kind == "opaque":
                _ensure_dirs(state, op.path)
        for op in layer:
            if op.kind in ("whiteout", "opaque"):
                continue
            _ensure_dirs(state, op.path.rpartition("/")[0])
            existing = state.get(op.path)
            if op.kind == "dir":
                if existing is None or existing[0] != "dir":
                    _remove(state, op.path)
                state[op.path] = ("dir", op.value)
            elif op.kind == "hardlink":
                target = state.get(op.value)
                if target is None or target[0] == "dir":
                    continue  # dropped: nothing (or a directory) to link to
                _remove(state, op.path)
                state[op.path] = target
            else:
                _remove(state, op.path)
                state[op.path] = (
                    ("symlink", DANGLING) if op.kind == "symlink" else ("file", op.value)
                )
    return state


def _entries(layer: list[Op]) -> list[TarEntry]:
    out = []
    for op in layer:
        parent, _, name = op.path.rpartition("/")
        if op.kind == "whiteout":
            path = f"{parent}/.wh.{name}" if parent else f".wh.{name}"
            out.append(TarEntry(path, EntryType.FILE, 0o644, 0, 0, 0, 0))
        elif op.kind == "opaque":
            path = f"{op.path}/.wh..wh..opq" if op.path else ".wh..wh..opq"
            out.append(TarEntry(path, EntryType.FILE, 0o644, 0, 0, 0, 0))
        elif op.kind == "dir":
            out.append(TarEntry(op.path, EntryType.DIRECTORY, int(op.value, 8), 0, 0, 0, 0))
        elif op.kind == "symlink":
            out.append(TarEntry(op.path, EntryType.SYMLINK, 0o777, 0, 0, 0, 0, DANGLING))
        elif op.kind == "hardlink":
            out.append(TarEntry(op.path, EntryType.HARDLINK, 0o644, 0, 0, 0, 0, op.value))
        else:
            # The content is the file's identity: data_offset carries it.
            content = ord(op.value)
            out.append(TarEntry(op.path, EntryType.FILE, 0o644, 0, 0, 1, 0, data_offset=content))
    return out


def _flatten(root: Node) -> Model:
    out: Model = {}
    stack: list[tuple[str, Node]] = [("", root)]
    while stack:
        path, node = stack.pop()
        assert node.children is not None
        for name, child in node.children.items():
            full = f"{path}/{name}" if path else name
            if child.is_dir:
                out[full] = ("dir", f"{child.mode:o}")
                stack.append((full, child))
            elif child.type is EntryType.SYMLINK:
                out[full] = ("symlink", child.target)
            else:
                out[full] = ("file", chr(child.data_offset))
    return out


@FUZZ
@given(stacks)
def test_merge_matches_the_reference_model(layers: list[list[Op]]) -> None:
    root = merge_layers([_entries(layer) for layer in layers], lambda _: None)
    assert _flatten(root) == model_merge(layers)
    freeze(root)  # numbering never fails on a merged tree


# A handful of stacks are also unpacked by umoci, the independent
# implementation, restricted to what umoci accepts: umoci refuses a file as a
# parent ("mkdir parent: not a directory", where imagefs documents an implied
# directory replacing it), does not create the directory of an opaque marker
# without an entry for it (imagefs does), follows a dangling symlink parent on
# the host side of its secure join, and refuses hardlinks to missing targets.
# So: directories are named from NAMES, files only at leaves (f1, f2), and
# every opaque marker comes with its directory's entry.
dir_paths = paths
file_paths = st.tuples(st.one_of(st.just(""), dir_paths), st.sampled_from(("f1", "f2"))).map(
    lambda pair: f"{pair[0]}/{pair[1]}" if pair[0] else pair[1]
)
simple_ops = st.one_of(
    st.builds(Op, st.just("file"), file_paths, st.sampled_from(("x", "y", "z"))).map(
        lambda op: [op]
    ),
    st.builds(Op, st.just("dir"), dir_paths, st.just("755")).map(lambda op: [op]),
    st.builds(Op, st.just("whiteout"), st.one_of(dir_paths, file_paths)).map(lambda op: [op]),
    dir_paths.map(lambda path: [Op("dir", path, "755"), Op("opaque", path)]),
)
simple_layers = st.lists(simple_ops, max_size=5).map(lambda groups: [o for g in groups for o in g])


def _layer_tar(layer: list[Op]) -> bytes:
    members = []
    for op in layer:
        if op.kind == "file":
            members.append(builder.file(op.path, op.value))
        elif op.kind == "dir":
            members.append(builder.directory(op.path))
        elif op.kind == "whiteout":
            members.append(builder.whiteout(op.path))
        else:
            members.append(builder.opaque(op.path))
    return builder.make_layer_tar(members)


@pytest.mark.tools
@settings(FUZZ, max_examples=max(EXAMPLES // 20, 10))
@given(st.lists(simple_layers, min_size=1, max_size=3))
def test_model_agrees_with_umoci(
    tmp_path_factory: pytest.TempPathFactory, layers: list[list[Op]]
) -> None:
    require_tools("umoci", "skopeo")
    require_root()
    tmp = tmp_path_factory.mktemp("umoci")
    layout = builder.write_oci_layout(tmp / "layout", [_layer_tar(layer) for layer in layers])
    rootfs = umoci_unpack(layout, "latest", tmp / "bundle")
    seen = {
        path: (record.type, record.sha256 or "")
        for path, record in snapshot(rootfs).items()
        if path
    }
    expected = {
        path: (kind, hashlib.sha256(value.encode()).hexdigest() if kind == "file" else "")
        for path, (kind, value) in model_merge(layers).items()
    }
    assert seen == expected


@FUZZ
@given(
    st.lists(st.sampled_from(("a", ".", "..", "", ".wh.x", "b" * 64, "\u00e9" * 70)), max_size=6),
    st.booleans(),
    st.booleans(),
)
def test_clean_path_fast_path_agrees_with_the_component_walk(
    parts: list[str], dot_slash: bool, slash: bool
) -> None:
    name = ("./" if dot_slash else "") + "/".join(parts) + ("/" if slash else "")
    assert clean_path(name) == _clean_slow(name.split("/"))


# ------------------------------------------------------------ tar scanner


def _valid_tar() -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as archive:
        for name, data in (("a", b"hello"), ("dir/b" + "x" * 120, b"long"), ("c", b"")):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.pax_headers = {"SCHILY.xattr.user.k": "v"}
            archive.addfile(info, io.BytesIO(data))
        link = tarfile.TarInfo("l")
        link.type = tarfile.SYMTYPE
        link.linkname = "a"
        archive.addfile(link)
    return out.getvalue()


VALID_TAR = _valid_tar()


class _Stream:
    def __init__(self, data: bytes) -> None:
        self._data = data
        self._pos = 0

    def read(self, n: int) -> bytes:
        chunk = self._data[self._pos : self._pos + n]
        self._pos += len(chunk)
        return chunk

    def skip(self, n: int) -> None:
        self._pos = min(self._pos + n, len(self._data))

    def tell(self) -> int:
        return self._pos


def _scan(data: bytes) -> list[TarEntry]:
    try:
        return list(scan_tar(_Stream(data), lambda _: None))
    except TarFormatError:
        return []


mutations = st.lists(
    st.tuples(st.integers(0, len(VALID_TAR) - 1), st.integers(0, 255)), min_size=1, max_size=16
)


@FUZZ
@given(mutations, st.integers(0, len(VALID_TAR)))
def test_tar_scanner_on_mutated_archives(changes: list[tuple[int, int]], cut: int) -> None:
    data = bytearray(VALID_TAR)
    for offset, value in changes:
        data[offset] = value
    for entry in _scan(bytes(data[:cut]) if cut % 3 == 0 else bytes(data)):
        assert entry.size >= 0 and entry.data_offset >= 0
        assert 0 <= entry.uid < 1 << 32 and 0 <= entry.gid < 1 << 32


@FUZZ
@given(st.binary(max_size=4096))
def test_tar_scanner_on_random_bytes(data: bytes) -> None:
    _scan(data)


# ------------------------------------------------------------- manifests


def _containers(inner: st.SearchStrategy[object]) -> st.SearchStrategy[object]:
    return st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=5)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    _containers,
    max_leaves=30,
)
DIGEST = "sha256:" + "a" * 64
KEYS = ("schemaVersion", "mediaType", "config", "layers", "manifests", "digest", "size")


def _plausible() -> st.SearchStrategy[object]:
    descriptor = st.fixed_dictionaries(
        {},
        optional={
            "mediaType": st.sampled_from(
                (
                    "application/vnd.oci.image.layer.v1.tar+gzip",
                    "application/vnd.oci.image.config.v1+json",
                    "application/vnd.oci.image.manifest.v1+json",
                    "text/plain",
                )
            )
            | json_values,
            "digest": st.just(DIGEST) | json_values,
            "size": st.integers(-5, 1 << 70) | json_values,
            "platform": json_values,
            "annotations": json_values,
        },
    )
    return st.fixed_dictionaries(
        {},
        optional={
            "schemaVersion": st.sampled_from((1, 2, 3, "2")) | json_values,
            "mediaType": st.sampled_from(
                (
                    "application/vnd.oci.image.manifest.v1+json",
                    "application/vnd.oci.image.index.v1+json",
                    "application/vnd.docker.distribution.manifest.v2+json",
                )
            )
            | json_values,
            "config": descriptor | json_values,
            "layers": st.lists(descriptor, max_size=3) | json_values,
            "manifests": st.lists(descriptor, max_size=3) | json_values,
            "os": st.just("linux") | json_values,
            "architecture": st.just("amd64") | json_values,
            "rootfs": st.fixed_dictionaries(
                {}, optional={"type": st.just("layers") | json_values, "diff_ids": json_values}
            )
            | json_values,
        },
    )


@FUZZ
@given(_plausible() | json_values, st.sampled_from((None, "application/json", *KEYS)))
def test_manifest_parsers_raise_only_imagefs_errors(document: object, expected: str | None) -> None:
    data = json.dumps(document).encode()
    for parse in (
        lambda: parse_manifest_or_index(data, "fuzz", expected),
        lambda: parse_config(data, "fuzz"),
    ):
        try:
            parse()
        except ImageFSError as exc:
            assert "\n" not in str(exc)


@FUZZ
@given(st.binary(max_size=512))
def test_manifest_parsers_on_random_bytes(data: bytes) -> None:
    for parse in (
        lambda: parse_manifest_or_index(data, "fuzz"),
        lambda: parse_config(data, "fuzz"),
    ):
        try:
            parse()
        except ImageFSError:
            pass


# ------------------------------------------------------------------ TOCs

TOC_ITEMS = [
    toccraft.Item("d/", kind="dir", mode=0o755),
    toccraft.Item("d/a", data=b"hello " * 300),
    toccraft.Item("d/big", data=bytes(range(256)) * 300),
    toccraft.Item("d/link", kind="hardlink", link="d/a"),
    toccraft.Item("d/s", kind="symlink", link="a"),
]
TOC_BLOBS = (
    toccraft.estargz(TOC_ITEMS, chunk_size=20_000),
    toccraft.estargz(TOC_ITEMS, legacy=True),
    toccraft.zstd_chunked(TOC_ITEMS, chunk_size=20_000),
)
PAYLOAD_END = 100_000


def _check_toc(toc: Toc | NotServable, payload_end: int) -> None:
    """What every TOC that parses guarantees (imagefs.layers.toc.jsontoc)."""
    if isinstance(toc, NotServable):
        return
    space = TOC_DATA_BASE
    last = (-1, -1)
    for position, entry in enumerate(toc.entries):
        chunks = toc.chunks.chunks_of(position)
        assert _toc_clean(entry.path) and (entry.type is not EntryType.HARDLINK or
                                           _toc_clean(entry.linkname))  # fmt: skip
        if entry.type is not EntryType.FILE:
            assert entry.size == 0 and not chunks
            continue
        assert entry.data_offset == space
        space += entry.size
        covered = 0
        for chunk in chunks:
            assert chunk.file_offset == covered and chunk.size > 0
            covered += chunk.size
            if entry.path != "stargz.index.json":
                assert chunk.offset >= 0 and chunk.offset + chunk.length <= payload_end
                assert (chunk.offset, chunk.inner_offset) > last
                last = (chunk.offset, chunk.inner_offset)
        assert covered == entry.size
    assert len(toc.chunks) == sum(
        len(toc.chunks.chunks_of(position)) for position in range(len(toc.entries))
    )
    assert space - TOC_DATA_BASE == toc.data_size


def _toc_clean(name: str) -> bool:
    return clean_path(name) is not None or "\0" in name or len(name) > 255


@FUZZ
@given(
    st.sampled_from(range(len(TOC_BLOBS))),
    st.lists(st.tuples(st.integers(0, 1 << 16), st.integers(0, 255)), max_size=8),
    st.integers(0, 80),
    st.booleans(),
)
def test_toc_readers_on_mutated_blobs(
    which: int, changes: list[tuple[int, int]], cut: int, annotated: bool
) -> None:
    crafted = TOC_BLOBS[which]
    blob = bytearray(crafted.blob)
    for offset, value in changes:
        # Most changes in the last few hundred bytes: footers and the TOC.
        blob[len(blob) - 1 - offset % len(blob) if offset % 2 else offset % len(blob)] = value
    data = bytes(blob[: len(blob) - cut] if cut > 60 else blob)
    annotations = crafted.annotations if annotated else {}
    try:
        location = locate(len(data), annotations, data[-TAIL_SIZE:], "fuzz")
        if location is None:
            return
        toc = read_toc(toccraft.BytesBlob(data), location, where="fuzz", warn=lambda _: None)
    except ImageFSError as exc:
        assert "\n" not in str(exc)
        return
    _check_toc(toc, location.payload_end)
    if isinstance(toc, Toc):
        for index in range(len(toc.chunks)):
            chunk = toc.chunks.chunk(index)
            compressed = data[chunk.offset : chunk.offset + chunk.length]
            try:
                decode_chunk(toc.format, chunk, compressed, where="fuzz")
            except ImageFSError:
                pass


toc_ints = st.integers(0, 1 << 20) | st.integers(-3, 1 << 64) | json_values
toc_names = st.sampled_from(("a", "d/a", "./b", "/c", "../x", "a/../..", "", "a\0b")) | st.text(
    max_size=6
)
toc_entries = st.fixed_dictionaries(
    {"type": st.sampled_from(("reg", "chunk", "dir", "hardlink", "symlink", "char")) | json_values},
    optional={
        "name": toc_names | json_values,
        "size": toc_ints,
        "offset": toc_ints,
        "endOffset": toc_ints,
        "innerOffset": toc_ints,
        "chunkOffset": toc_ints,
        "chunkSize": toc_ints,
        "chunkDigest": st.just("sha256:" + "b" * 64) | json_values,
        "digest": st.just("sha256:" + "c" * 64) | json_values,
        "chunkType": st.sampled_from(("", "zeros", "x")),
        "linkName": toc_names | json_values,
        "mode": toc_ints,
        "uid": toc_ints,
        "modtime": st.sampled_from(("2020-01-01T00:00:00Z", "0000-01-01T00:00:00.1+23:59"))
        | json_values,
        "xattrs": st.dictionaries(st.text(max_size=4), st.sampled_from(("", "AA==", "*"))),
        "devMajor": toc_ints,
    },
)


@FUZZ
@given(
    st.fixed_dictionaries(
        {"version": st.just(1) | json_values, "entries": st.lists(toc_entries, max_size=12)}
    )
    | json_values
)
def test_toc_json_parser_raises_only_toc_errors(document: object) -> None:
    data = json.dumps(document).encode()
    try:
        parsed = parse_entries(data, toc_format=TocFormat.ESTARGZ, payload_end=PAYLOAD_END,
                               where="fuzz", warn=lambda _: None)  # fmt: skip
    except TocError as exc:
        assert "\n" not in str(exc)
        return
    if isinstance(parsed, NotServable):
        return
    entries, chunks = parsed
    _check_toc(Toc(TocFormat.ESTARGZ, Digest.of(data), entries, chunks, PAYLOAD_END), PAYLOAD_END)


@FUZZ
@given(
    st.binary(max_size=TAIL_SIZE),
    st.integers(0, 1 << 40),
    st.dictionaries(
        st.sampled_from(
            (
                "containerd.io/snapshot/stargz/toc.digest",
                "io.github.containers.zstd-chunked.manifest-position",
                "io.containers.zstd-chunked.manifest-position",
                "io.containers.zstd-chunked.manifest-checksum",
            )
        ),
        st.sampled_from(("sha256:" + "d" * 64, "1:2:3:1", "8:8:8:1", "x")) | st.text(max_size=20),
        max_size=3,
    ),
)
def test_footer_and_annotation_parsers_raise_only_imagefs_errors(
    tail: bytes, size: int, annotations: dict[str, str]
) -> None:
    for blob_size in (len(tail), size):
        try:
            location = locate(blob_size, annotations, tail, "fuzz")
        except ImageFSError as exc:
            assert "\n" not in str(exc)
            continue
        if location is not None:
            assert 0 <= location.payload_end <= location.offset
            assert location.offset + location.length <= blob_size
