"""Property tests and fuzzing (hypothesis): merge, tar scanner, manifest parsers.

* The merged tree of random layer stacks equals a small reference model of
  the OCI changeset rules (image-spec layer.md), written here from the spec
  and not from imagefs.tree.overlay; a few stacks are also unpacked by umoci.
* The tar scanner, fed mutated archives, yields entries or raises
  TarFormatError, nothing else.
* The manifest, index and config parsers, fed arbitrary JSON, return or
  raise an ImageFSError, nothing else.

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

from imagefs.errors import ImageFSError, TarFormatError
from imagefs.layers.entry import EntryType, TarEntry
from imagefs.layers.tarscan import scan_tar
from imagefs.sources.manifest import parse_config, parse_manifest_or_index
from imagefs.tree.merged import freeze
from imagefs.tree.overlay import Node, _clean_slow, clean_path, merge_layers
from tests import builder
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
