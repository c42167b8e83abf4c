"""Hostile images, generated: what each one is, and what imagefs must make of it.

Every case is a stack of layer tars (raw bytes, crafted header by header with
:mod:`tests.tarcraft` where real writers cannot produce them) with either an
:class:`Served` expectation (the image mounts; these paths hold this, those
are absent) or a :class:`Refused` one (``imagefs mount`` exits non-zero with
one line naming the problem). ``tests/test_hostile.py`` runs every case
through the loader in-process and through a real mount.

Hostile inputs covered elsewhere, and not repeated here (SECURITY.md lists
them too):

* tar headers: bad and non-numeric checksums, truncated headers and data,
  bogus PAX records and lengths, negative and huge base-256 sizes, huge long
  names and PAX headers, endless extension headers, bad sparse maps, random
  corruption and random header fields (``tests/test_tarscan.py``);
* path traversal and symlinked parents in the merge (``tests/test_overlay.py``);
* manifests: cycles and deep nesting of indexes, huge JSON, missing fields,
  wrong media types, symlinks leaving an archive (``tests/test_sources.py``);
* registries: cut transfers, wrong blobs, 5xx, credentials in debug logs
  (``tests/test_registry_live.py``);
* setuid binaries and device nodes under ``nosuid,nodev``
  (``tests/test_linux.py``);
* corrupt cached trees and rewritten blobs (``tests/test_persisted_tree.py``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from tests import tarcraft as tc
from tests.builder import Compression, write_oci_layout

# What a path of a served image must be: file content (bytes), a symlink
# target ("-> target"), or "dir".
Expected = bytes | str


@dataclass(frozen=True)
class Served:
    """The image mounts; ``present`` paths hold what is given, ``absent`` ones do not exist."""

    present: Mapping[str, Expected] = field(default_factory=dict)
    absent: Sequence[str] = ()
    warns: Sequence[str] = ()  # substrings of expected warnings


@dataclass(frozen=True)
class Refused:
    """``imagefs mount`` fails with one line containing ``message``."""

    message: str


@dataclass(frozen=True)
class Case:
    name: str
    what: str
    layers: Callable[[], list[bytes]]  # built lazily: some are large
    expect: Served | Refused
    compression: Compression = "none"
    env: Mapping[str, str] = field(default_factory=dict)

    def write(self, dest: Path) -> Path:
        """An OCI layout of this case at ``dest``, tagged ``latest``."""
        return write_oci_layout(dest, self.layers(), compression=self.compression)


def _tar(*members: bytes) -> bytes:
    data = b"".join(members) + tc.end()
    return data + bytes(-len(data) % 10240)


def _file(name: str | bytes, data: bytes = b"", **fields: object) -> bytes:
    raw = name if isinstance(name, bytes) else name.encode("utf-8", "surrogateescape")
    if len(raw) <= 100:
        return tc.member(raw, data, **fields)
    # Long names go in a PAX record, as every modern writer does.
    return tc.pax([(b"path", raw)]) + tc.member(b"longname", data, **fields)


def _dir(name: str) -> bytes:
    return _file(name, typeflag=b"5", mode=0o755)


def _symlink(name: str, target: str) -> bytes:
    if len(target.encode()) <= 100:
        return _file(name, typeflag=b"2", linkname=target.encode(), mode=0o777)
    return tc.pax([(b"linkpath", target.encode())]) + _file(name, typeflag=b"2", mode=0o777)


def _hardlink(name: str, target: str) -> bytes:
    return _file(name, typeflag=b"1", linkname=target.encode())


def _base() -> bytes:
    return _tar(_dir("etc"), _file("etc/passwd", b"image passwd\n"), _dir("a"), _file("a/f", b"f"))


# --------------------------------------------------------------------- paths


def _traversal() -> list[bytes]:
    return [
        _tar(
            _file("../../etc/passwd", b"escaped"),
            _file("a/../../../x", b"escaped"),
            _file("./../y", b"escaped"),
            _file("ok/../inside", b"inside"),
        )
    ]


def _absolute() -> list[bytes]:
    return [_tar(_file("/etc/passwd", b"image passwd\n"), _file("//abs//twice", b"twice"))]


def _dot_tricks() -> list[bytes]:
    return [_tar(_file("./a//b/./c", b"c"), _file(".//x/.", b"x"), _file("./", typeflag=b"5"))]


def _nul_in_name() -> list[bytes]:
    return [_tar(tc.pax([(b"path", b"evil\x00/../../etc/passwd")]) + tc.member(b"x", b"nul"))]


def _control_chars() -> list[bytes]:
    invalid_utf8 = "bad\xff\xfeutf8".encode("latin-1")
    return [_tar(_file("ctl\n\t\x1b[31mred\x7f", b"ctl"), _file(invalid_utf8))]


def _long_names() -> list[bytes]:
    component = "n" * 255
    deep = "/".join([component] * 16)  # 4 KiB of path, every component legal
    return [
        _tar(
            _file("x" * 256, b"too long"),  # one component over NAME_MAX
            _file("y" * 4096, b"4 KiB component"),
            _file(deep, b"deep 4 KiB path"),
        )
    ]


# ------------------------------------------------------------------ symlinks


def _symlink_loops() -> list[bytes]:
    return [
        _tar(
            _symlink("loop_a", "loop_b"),
            _symlink("loop_b", "loop_a"),
            _symlink("self", "self"),
            _file("loop_a/x", b"under a loop"),  # parent is a loop: an implied dir replaces it
        )
    ]


def _symlinks_to_host() -> list[bytes]:
    return [
        _base(),
        _tar(
            _symlink("hostetc", "/etc"),
            _symlink("up", "../../../../.."),
            _file("hostetc/planted", b"in the image's /etc"),  # followed inside the tree only
            _file("up/etc/up_planted", b"clamped at the root"),
            _symlink("long", "/" + "t" * 4000),
        ),
    ]


# ----------------------------------------------------------------- hardlinks


def _hardlinks() -> list[bytes]:
    return [
        _tar(
            _hardlink("missing", "does/not/exist"),
            _hardlink("later", "defined_after"),
            _file("defined_after", b"later"),
            _hardlink("self", "self"),
            _dir("d"),
            _hardlink("to_dir", "d"),
            _hardlink("escape", "../../etc/passwd"),
            _file("real", b"real"),
            _hardlink("good", "real"),
        )
    ]


# ----------------------------------------------------------------- whiteouts


def _whiteouts() -> list[bytes]:
    return [
        _base(),
        _tar(
            _file(".wh.", b""),  # names no entry (the root)
            _file(".wh..", b""),
            _file(".wh...", b""),
            _file("a/.wh..", b""),
            _file("a/.wh...", b""),
            _file("../.wh.etc", b""),  # outside the tree
            _file("/.wh.nothing_here", b""),
            _file(".wh..wh..opq/x", b""),  # inside a whiteout name
        ),
    ]


# ------------------------------------------------------------ duplicates


def _duplicates() -> list[bytes]:
    return [
        _tar(
            _file("dup", b"first"),
            _dir("dup"),
            _file("dup/child", b"child"),
            _file("dup", b"last wins"),
            _file("f", b"file"),
            _file("f/under_file", b"a file as a parent"),
            _symlink("s", "target"),
            _dir("s"),
        )
    ]


# ------------------------------------------------------------- tar format


def _negative_size() -> list[bytes]:
    head = tc.header(b"neg", raw={"size": tc.base256(-1, 12)})
    return [_tar(head)]


def _huge_size() -> list[bytes]:
    return [_tar(tc.header(b"huge", raw={"size": tc.base256(1 << 62, 12)}))]


def _bad_checksum() -> list[bytes]:
    block = bytearray(tc.header(b"x"))
    tc.set_checksum(block, 12345)
    return [_tar(bytes(block))]


def _truncated() -> list[bytes]:
    return [tc.member(b"file", b"x" * 4096)[:1024]]


def _bogus_pax_length() -> list[bytes]:
    return [_tar(tc.extension(b"999999 path=x\n") + tc.member(b"x"))]


# ---------------------------------------------------------- compression


def _bomb() -> list[bytes]:
    return [_tar(tc.header(b"zeros", size=64 << 20)) + bytes(64 << 20)]


def _gzip_bomb() -> list[bytes]:
    return _bomb()


# -------------------------------------------------------------- scale


def _many_entries(count: int) -> Callable[[], list[bytes]]:
    def build() -> list[bytes]:
        parts = [_dir("m")]
        parts.extend(tc.header(b"m/%d" % index) for index in range(count))
        return [_tar(*parts)]

    return build


def deep_path(depth: int) -> str:
    return "/".join(["d"] * depth)


def _deep(depth: int) -> Callable[[], list[bytes]]:
    def build() -> list[bytes]:
        parts = []
        for level in range(1, depth + 1):
            parts.append(_file(f"./{deep_path(level)}/", typeflag=b"5", mode=0o755))
        parts.append(_file(deep_path(depth) + "/bottom", b"bottom"))
        return [_tar(*parts)]

    return build


def cases(many: int = 100_000, depth: int = 10_000) -> Iterator[Case]:
    """Every hostile case; ``many`` empty entries and ``depth`` levels for the scale ones."""
    yield Case(
        "traversal",
        "'..' climbing out of the root is dropped; '..' that stays inside is resolved",
        _traversal,
        Served({"inside": b"inside"}, ["x", "y", "etc"], ["path leaves the root"]),
    )
    yield Case(
        "absolute",
        "absolute names land inside the image root (GNU tar strips '/')",
        _absolute,
        Served({"etc/passwd": b"image passwd\n", "abs/twice": b"twice"}),
    )
    yield Case(
        "dot-tricks",
        "'./', '//' and '/.' components are dropped",
        _dot_tricks,
        Served({"a/b/c": b"c", "x": b"x"}),
    )
    yield Case(
        "nul-in-name",
        "a PAX path holding NUL is refused (the name is cut at NUL nowhere)",
        _nul_in_name,
        Served({}, ["evil", "x"], ["path leaves the root"]),
    )
    yield Case(
        "control-characters",
        "names with control characters and invalid UTF-8 are served verbatim (as bytes)",
        _control_chars,
        Served({"ctl\n\t\x1b[31mred\x7f": b"ctl", "bad\udcff\udcfeutf8": b""}),
    )
    yield Case(
        "long-names",
        "a component over 255 bytes is dropped; a 4 KiB path of legal components is served",
        _long_names,
        Served({"/".join(["n" * 255] * 16): b"deep 4 KiB path"}, [], ["path leaves the root"]),
    )
    yield Case(
        "symlink-loops",
        "symlink loops are served verbatim; an entry under a loop gets an implied directory",
        _symlink_loops,
        Served({"loop_b": "-> loop_a", "self": "-> self", "loop_a/x": b"under a loop"}),
    )
    yield Case(
        "symlinks-to-host",
        "absolute and climbing symlinks resolve inside the image while merging, "
        "are served verbatim, and are never followed by the daemon",
        _symlinks_to_host,
        Served(
            {
                "hostetc": "-> /etc",
                "etc/planted": b"in the image's /etc",
                "etc/up_planted": b"clamped at the root",
                "etc/passwd": b"image passwd\n",
                "long": "-> /" + "t" * 4000,
            }
        ),
    )
    yield Case(
        "hardlinks",
        "hardlinks to missing, later, self, directories or outside are dropped with a warning",
        _hardlinks,
        Served(
            {"defined_after": b"later", "good": b"real", "d": "dir"},
            ["missing", "later", "self", "to_dir", "escape"],
            ["dropping hardlink"],
        ),
    )
    yield Case(
        "whiteouts",
        "whiteouts of '', '.', '..', the root or outside the tree remove nothing",
        _whiteouts,
        Served({"etc/passwd": b"image passwd\n", "a/f": b"f"}, [], ["names no entry"]),
    )
    yield Case(
        "duplicates",
        "in one layer the last entry for a path wins; a file parent becomes a directory",
        _duplicates,
        Served({"dup": b"last wins", "f/under_file": b"a file as a parent", "s": "dir"}),
    )
    yield Case("negative-size", "a negative size", _negative_size, Refused("size"))
    yield Case("huge-size", "a size past the end of the layer", _huge_size, Refused("layer"))
    yield Case("bad-checksum", "a header checksum mismatch", _bad_checksum, Refused("checksum"))
    yield Case("truncated", "a layer cut inside a member's data", _truncated, Refused("trunc"))
    yield Case(
        "bogus-pax-length",
        "a PAX record whose length runs past its header",
        _bogus_pax_length,
        Refused("pax"),
    )
    yield Case(
        "gzip-bomb",
        "gzip cannot pass ~1032:1, so the ratio limit lowered to 100 catches it",
        _gzip_bomb,
        Refused("decompression bomb"),
        compression="gzip",
        env={"IMAGEFS_MAX_EXPANSION": "100", "IMAGEFS_EXPANSION_FLOOR": str(1 << 20)},
    )
    yield Case(
        "zstd-bomb",
        "zstd decodes far past 1100:1; the default ratio refuses it (floor lowered: fast)",
        _bomb,
        Refused("decompression bomb"),
        compression="zstd",
        env={"IMAGEFS_EXPANSION_FLOOR": str(1 << 20)},
    )
    yield Case(
        "many-empty-entries",
        f"{many} empty files in one directory: linear time and memory",
        _many_entries(many),
        Served({"m/0": b"", f"m/{many - 1}": b""}),
        compression="gzip",
    )
    yield Case(
        "deep-nesting",
        f"{depth} nested directories: linear time, no recursion limit",
        _deep(depth),
        Served({deep_path(depth) + "/bottom": b"bottom"}),
        compression="gzip",
    )


__all__ = ["Case", "Refused", "Served", "cases", "deep_path"]
