"""The standard fixture images, and a lazy per-session catalog of them.

Each ``build_*`` function writes one image into a fresh directory and returns
``(layout, tag)``:

- ``basic``: built by umoci from real file-system changes (3 layers), the way
  an image builder makes images, whiteouts written by umoci.
- ``edge``: crafted entry by entry with tarfile (plain, gzip and zstd
  layers): opaque markers, whiteouts, type replacements, implied directories,
  duplicates, hardlinks, long names, xattrs, devices, sparse and big files.
- ``portable``: ``basic`` without its directory -> symlink replacement, so
  that the engines can pull it: dockerd 20.10 and podman 4.3 cannot apply a
  whiteout below a same-layer symlink (``srv/cache/.wh.item``: "failed to
  mknod", "processing tar file(no such file or directory)"), and both refuse
  ``edge``'s duplicate paths ("duplicates of file paths not supported").
  containerd keeps any image in its content store without unpacking it.
- ``store``: crafted for the host stores (podman's containers-storage and
  Docker's overlay2, which keep layers extracted plus tar-split): whiteouts,
  an opaque directory, hardlinks, xattrs, setuid/setgid/sticky modes,
  devices, a FIFO, symlinks, PAX and GNU long names, UTF-8 names, sub-second
  mtimes, a multi-MiB file, in three layers (PAX, GNU, PAX; gzip). No
  duplicate paths (tar-split refuses them) and no sparse files (tar-split
  rebuilds their expanded bytes, not the stored ones).

Every image must be one that ``umoci unpack`` reproduces faithfully, so that
tests can compare a mount with :mod:`tests.oracle`. Left out for that reason
(test them against explicit expectations instead):

- old GNU sparse members (typeflag ``S``): umoci fails on them (PAX sparse is in);
- ``security.selinux`` xattrs: umoci drops them (tests.oracle.umoci_unpack
  fails on any umoci warning, so such an image cannot slip in);
- ``user.*`` xattrs on symlinks: Linux refuses them, umoci cannot set them;
- symlinks with a mode other than 0777: Linux symlinks are always 0777;
- directories that are only implied, and those umoci creates implied ones in:
  their mtimes are the unpack time (the oracle marks them unknown).

The path constants name features tests look for.
"""

from __future__ import annotations

import os
import random
import shutil
import stat
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

from tests import builder, oracle
from tests.builder import NS, Member, directory, file, hardlink, opaque, symlink, whiteout

# --------------------------------------------------------------------------- basic

BASIC_TAG = "basic"
PORTABLE_TAG = "portable"
BASIC_LONG_DIR = "long/" + "d" * 100 + "/" + "e" * 100
BASIC_LONG_PATH = BASIC_LONG_DIR + "/" + "f" * 80 + ".txt"  # 288 characters
BASIC_UTF8_NAME = "docs/name with spaces é ü 日本語.txt"
BASIC_HARDLINKS = ("bin/tool", "bin/tool-hardlink")
BASIC_DELETED = ("etc/obsolete-dir", "opt/old/file")  # removed in layer 2, not re-created
BASIC_RECREATED = ("etc/obsolete", "opt/old")  # removed in layer 2, back in layer 3
# umoci repack rounds mtimes to whole seconds (Go archive/tar's default
# format), so this file's 0.75 s becomes +1 s in the layer itself.
BASIC_SUBSECOND = ("usr/share/doc/readme", 1_577_934_245_750_000_000)


def build_basic(dest: Path) -> tuple[Path, str]:
    """A three-layer image built by umoci from real file-system changes."""
    layout = dest / "basic"
    builder.umoci_build(layout, BASIC_TAG, [basic_base, basic_changes, basic_replacements])
    return layout, BASIC_TAG


def basic_base(root: Path) -> None:
    """Layer 1: a small root file system with every kind of file."""
    for name in ("bin", "etc/obsolete-dir", "usr/share/doc", "var/tmp", "home/user", "srv/cache"):
        (root / name).mkdir(parents=True)
    for name in ("srv/shared", "opt/old/sub", "dev", "run", "docs", BASIC_LONG_DIR):
        (root / name).mkdir(parents=True)
    _write(root / "etc/passwd", "root:x:0:0:root:/root:/bin/sh\n")
    _write(root / "etc/shadow", "root:*:19000::::::\n", mode=0o640, owner=(0, 42))
    _write(root / "etc/obsolete", "to be deleted\n")
    _write(root / "etc/obsolete-dir/conf", "deleted with its directory\n")
    _write(root / "etc/motd", "a file, a directory later\n")
    _write(root / "bin/tool", "#!/bin/sh\necho tool\n", mode=0o755)
    os.link(root / "bin/tool", root / "bin/tool-hardlink")
    _write(root / "bin/suid", "setuid\n", mode=0o4755)
    _write(root / "bin/sgid", "setgid\n", mode=0o2755)
    _write(root / "home/user/notes.txt", "owned by 1000\n", owner=(1000, 1000))
    _chown_chmod(root / "home/user", (1000, 1000), 0o700)
    _write(root / "srv/data.bin", bytes(range(256)) * 16, owner=(12345, 12345), mode=0o600)
    _chown_chmod(root / "srv/shared", (0, 12345), 0o2775)
    _chown_chmod(root / "var/tmp", (0, 0), 0o1777)
    _write(root / "srv/cache/item", "cached\n")
    _write(root / "opt/old/file", "old\n")
    _write(root / "opt/old/sub/deeper", "old, deeper\n")
    (root / "bin/rel").symlink_to("tool")
    (root / "etc/abs").symlink_to("/etc/passwd")
    (root / "usr/bin").symlink_to("../bin")
    (root / "dangling").symlink_to("/nonexistent/target")
    os.mkfifo(root / "run/fifo", 0o600)
    os.mknod(root / "dev/null", 0o666 | stat.S_IFCHR, os.makedev(1, 3))
    os.chmod(root / "dev/null", 0o666)  # mknod's mode is filtered by the umask
    readme = root / BASIC_SUBSECOND[0]
    _write(readme, "xattrs and a sub-second mtime\n")
    os.setxattr(readme, "user.comment", b"hello")
    os.setxattr(readme, "user.binary", b"\x00\x01\xfe\xff")
    os.setxattr(readme, "trusted.note", b"trusted")
    os.setxattr(root / "usr/share/doc", "user.dir", b"a directory xattr")
    _write(root / BASIC_LONG_PATH, "a path longer than 255 bytes\n")
    _write(root / BASIC_UTF8_NAME, "spaces and UTF-8\n")
    # Last, after every change to its directory.
    os.utime(readme, ns=(BASIC_SUBSECOND[1], BASIC_SUBSECOND[1]))


def basic_changes(root: Path) -> None:
    """Layer 2: deletions (umoci writes the whiteouts), an edit, a mode change."""
    (root / "etc/obsolete").unlink()
    shutil.rmtree(root / "etc/obsolete-dir")
    shutil.rmtree(root / "opt/old")
    with open(root / "etc/passwd", "a") as f:
        f.write("user:x:1000:1000::/home/user:/bin/sh\n")
    os.chmod(root / "etc/shadow", 0o600)


def basic_replacements(root: Path) -> None:
    """Layer 3: file -> directory, directory -> symlink, deleted paths re-created."""
    portable_replacements(root)
    # umoci writes "srv/cache" as a symlink *and* a whiteout "srv/cache/.wh.item"
    # below it: a whiteout under a same-layer symlink, which must not resurrect
    # a directory.
    shutil.rmtree(root / "srv/cache")
    (root / "srv/cache").symlink_to("/var/cache")


def build_portable(dest: Path) -> tuple[Path, str]:
    """``basic`` as every engine can pull it (see the module docstring)."""
    layout = dest / "portable"
    builder.umoci_build(layout, PORTABLE_TAG, [basic_base, basic_changes, portable_replacements])
    return layout, PORTABLE_TAG


def portable_replacements(root: Path) -> None:
    """Layer 3 without the directory -> symlink: file -> directory, deleted paths re-created."""
    (root / "etc/motd").unlink()
    _write(root / "etc/motd/00-welcome", "now a directory\n")
    _write(root / "etc/obsolete", "back again\n")
    _write(root / "opt/old/new", "a new directory where one was deleted\n")


def _write(
    path: Path, data: str | bytes, *, mode: int = 0o644, owner: tuple[int, int] = (0, 0)
) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data.encode() if isinstance(data, str) else data)
    _chown_chmod(path, owner, mode)


def _chown_chmod(path: Path, owner: tuple[int, int], mode: int) -> None:
    os.chown(path, *owner)
    os.chmod(path, mode)  # after chown, which clears setuid/setgid


# --------------------------------------------------------------------------- edge

EDGE_TAG = "edge"
EDGE_ROOT_MODE = 0o751
EDGE_GNU_LONG_NAME = "gnu/" + "L" * 150 + "/" + "N" * 150
EDGE_PAX_LONG_NAME = "paxlong/" + "p" * 200 + "/" + "q" * 200
EDGE_BIG = "big/random.bin"
EDGE_BIG_SIZE = 24 << 20
EDGE_SPARSE = "sparse/disk.img"
EDGE_SUBSECOND_NS = 1_234_567_890_123_456_789
EDGE_BIG_UID = 3_000_000  # beyond ustar's 7 octal digits: a PAX uid record


def build_edge(dest: Path) -> tuple[Path, str]:
    """Three hand-crafted layers: plain/PAX, gzip/GNU, zstd/PAX."""
    layout = dest / "edge"
    layers = [
        builder.make_layer_tar(edge_layer1(), format="pax"),
        builder.make_layer_tar(edge_layer2(), format="gnu"),
        builder.make_layer_tar(edge_layer3(), format="pax"),
    ]
    builder.write_oci_layout(layout, layers, compression=["none", "gzip", "zstd"], tag=EDGE_TAG)
    return layout, EDGE_TAG


def edge_layer1() -> list[Member]:
    """The lower tree that layers 2 and 3 change."""
    return [
        directory("./", mode=EDGE_ROOT_MODE),
        # opaque in layer 2
        directory("opq", mtime_ns=1_100_000_000 * NS),
        file("opq/lower", "hidden by the opaque marker"),
        directory("opq/lowerdir"),
        file("opq/lowerdir/x", "hidden too"),
        # whiteouts in layer 2
        directory("wh"),
        file("wh/file", "whited out"),
        directory("wh/dir"),
        file("wh/dir/a", "whited out with its directory"),
        directory("wh/dir/sub"),
        file("wh/dir/sub/b", "also"),
        file("wh/stays", "not whited out"),
        # type replacements in layer 2
        directory("tree"),
        directory("tree/sub"),
        file("tree/sub/x", "hidden when a file replaces tree"),
        file("was_file", "replaced by a directory"),
        directory("keepkids", mode=0o755, mtime_ns=1_200_000_000 * NS),
        file("keepkids/kid", "survives a directory-over-directory entry"),
        directory("samelayer"),
        file("samelayer/old", "gone: layer 3 whites out samelayer and re-creates it"),
        # Directories without entries are implied (0755, root-owned). Kept out
        # of the root: umoci stamps a directory it creates one in with the
        # unpack time, and the root's mtime (from "./") should stay checkable.
        directory("implied"),
        file("implied/a/b/file", "parents implied"),
        # last entry wins within a layer
        file("dup", "first", mode=0o600),
        file("dup", "second, wins", mode=0o640),
        # hardlinks
        directory("links"),
        file("links/target", "three names, one inode", uid=1000, gid=1000),
        hardlink("links/second", "links/target"),
        hardlink("links/third", "links/target"),
        directory("hl"),
        file("hl/orig", "layer 2 whites out this name; the alias survives"),
        hardlink("hl/alias", "hl/orig"),
        # a hardlink to a name a later entry of the same layer replaces: the
        # link keeps the earlier file (what tar and umoci do)
        directory("relink"),
        file("relink/t", "first content"),
        hardlink("relink/l", "relink/t"),
        file("relink/t", "second content"),
        # xattrs (no user.* on symlinks: Linux refuses them; no security.selinux:
        # umoci drops it)
        directory("xattr", xattrs={"user.dir": b"on a directory", "trusted.dir": b"t"}),
        file(
            "xattr/file",
            "xattrs",
            xattrs={
                "user.mime": b"text/plain",
                "user.binary": b"\x00\x01\xfe\xff",
                "trusted.flag": b"1",
                "security.imagefs-test": b"s",
            },
        ),
        symlink("xattr/link", "file", xattrs={"trusted.link": b"on a symlink"}),
        # special files and modes
        directory("dev"),
        Member("dev/null", "char", mode=0o666, devmajor=1, devminor=3),
        Member("dev/loop7", "block", mode=0o660, gid=6, devmajor=7, devminor=7),
        directory("run"),
        Member("run/fifo", "fifo", mode=0o622),
        directory("perm"),
        file("perm/suid", "x", mode=0o4755),
        file("perm/sgid", "x", mode=0o2751),
        directory("perm/sticky", mode=0o1777),
        file("perm/none", "no permissions", mode=0o000),
        # times and owners
        directory("times", mtime_ns=EDGE_SUBSECOND_NS + 333),
        file("times/subsec", "sub-second mtime", mtime_ns=EDGE_SUBSECOND_NS),
        symlink("times/link", "subsec", mtime_ns=EDGE_SUBSECOND_NS + 111),
        directory("times/dir", mtime_ns=EDGE_SUBSECOND_NS + 222),
        file("times/epoch", "mtime 0", mtime_ns=0),
        directory("owners"),
        file("owners/names", "", uid=1234, gid=5678, uname="someone", gname="somegroup"),
        file("owners/big", "", uid=EDGE_BIG_UID, gid=EDGE_BIG_UID + 1),
        # names
        directory("./dotted"),
        file("./dotted/file", "a ./ prefix; replaced in layer 2 without it"),
        directory("/slash"),
        file("/slash/file", "a leading slash"),
        directory("names"),
        file("names/with space é ü 日本語", "UTF-8"),
        directory("paxlong"),
        file(EDGE_PAX_LONG_NAME, "a PAX path record (its parent is implied)"),
        symlink("paxlong/link", "t" * 400),
        symlink("links/relative", "../wh/stays"),
        symlink("links/absolute", "/etc/passwd"),
    ]


def edge_layer2() -> list[Member]:
    """GNU format, gzip: whiteouts, opaque, replacements, long names, a big file."""
    return [
        file("opq/before", "same layer, before the marker: stays"),
        opaque("opq"),
        file("opq/after", "same layer, after the marker: stays"),
        directory("opq/newdir"),
        whiteout("wh/file"),
        whiteout("wh/dir"),
        whiteout("nonexistent"),
        whiteout("nothere/deeper"),  # must not create "nothere"
        file("tree", "a file over a directory"),
        directory("was_file"),
        file("was_file/child", "a directory over a file"),
        directory("keepkids", mode=0o700, mtime_ns=1_300_000_000 * NS),
        whiteout("hl/orig"),
        file("dotted/file", "replaced without the ./ prefix"),
        # type changes within one layer: the last entry wins
        file("swap", "a file first"),
        directory("swap"),
        file("swap/kid", "then a directory"),
        symlink("swap2", "a symlink first"),
        file("swap2", "then a file"),
        # GNU long name and long link name records
        directory("gnu"),
        file(EDGE_GNU_LONG_NAME, "GNU long name (its parent is implied)"),
        symlink("gnu/longlink", "T" * 200),
        hardlink("gnu/hard-" + "H" * 120, EDGE_GNU_LONG_NAME),
        directory("big"),
        file(EDGE_BIG, random.Random(20240601).randbytes(EDGE_BIG_SIZE), mode=0o600),
    ]


def edge_layer3() -> list[Member]:
    """PAX format, zstd: re-creations, a fresh opaque dir, sparse data, new xattrs."""
    return [
        file("wh/dir", "whited out in layer 2, back as a file"),
        # a whiteout and a re-creation in one layer: the whiteout only hides
        # lower layers, the new file stays
        whiteout("samelayer"),
        file("samelayer", "re-created in the whiting-out layer"),
        directory("fresh"),
        opaque("fresh"),
        file("fresh/only", "opaque marker without a lower directory"),
        file("xattr/file", "replaced: xattrs are not merged", xattrs={"user.new": b"only this"}),
        directory("sparse"),
        Member(EDGE_SPARSE, data=sparse_data(), sparse=True, mode=0o640),
    ]


def sparse_data() -> bytes:
    """1 MiB + 100 bytes, mostly holes: data at 0, 256 KiB and 772 KiB."""
    data = bytearray(1 << 20 | 100)
    data[0:5] = b"head\n"
    data[256 << 10 : (256 << 10) + 7] = b"middle\n"
    data[772 << 10 : (772 << 10) + 8192] = b"D" * 8192
    return bytes(data)


# --------------------------------------------------------------------------- store

STORE_TAG = "store"
STORE_BIG_SIZE = 3 << 20


def build_store(dest: Path) -> tuple[Path, str]:
    """What the host-store engines can store, as a gzip OCI layout (see the module docstring)."""
    layout = dest / "store"
    builder.write_oci_layout(layout, store_layers(), compression="gzip", tag=STORE_TAG)
    return layout, STORE_TAG


def store_layers() -> list[bytes]:
    """Three layers (PAX, GNU, PAX) exercising what the stores must keep."""
    layer1 = [
        directory("etc"),
        file("etc/passwd", "root:x:0:0:root:/root:/bin/sh\n"),
        file("etc/shadow", "root:*:19000::::::\n", mode=0o640, gid=42),
        file("etc/obsolete", "deleted in layer 2\n"),
        directory("opq", mtime_ns=1_100_000_000 * NS),
        file("opq/lower", "hidden by layer 2's opaque marker"),
        directory("opq/lowerdir"),
        file("opq/lowerdir/x", "hidden too"),
        directory("gone"),
        file("gone/a", "whited out with its directory"),
        directory("bin"),
        file("bin/tool", "#!/bin/sh\necho tool\n", mode=0o755),
        hardlink("bin/tool-link", "bin/tool", mode=0o755),
        file("bin/suid", "setuid\n", mode=0o4755),
        file("bin/sgid", "setgid\n", mode=0o2755),
        directory("tmp", mode=0o1777),
        directory("home"),
        directory("home/user", uid=1000, gid=1000, mode=0o700),
        file("home/user/notes", "owned by 1000\n", uid=1000, gid=1000, mode=0o600),
        directory("xattr"),
        file(
            "xattr/file",
            "with xattrs",
            xattrs={"user.mime": b"text/plain", "trusted.flag": b"\x00\x01\xff"},
        ),
        directory("dev"),
        Member("dev/null", "char", mode=0o666, devmajor=1, devminor=3),
        Member("dev/loop7", "block", mode=0o660, gid=6, devmajor=7, devminor=7),
        Member("dev/fifo", "fifo", mode=0o622),
        directory("links"),
        symlink("links/relative", "../etc/passwd"),
        symlink("links/absolute", "/etc/shadow"),
        directory("times", mtime_ns=1_234_567_890_123_456_789),
        file("times/subsec", "sub-second mtime", mtime_ns=1_234_567_890_987_654_321),
        directory("names"),
        file("names/with space é ü 日本語", "UTF-8"),
        directory("paxlong"),
        directory("paxlong/" + "p" * 120),
        file("paxlong/" + "p" * 120 + "/" + "q" * 150, "a PAX path record"),
        file("empty", ""),
    ]
    layer2 = [
        whiteout("etc/obsolete"),
        whiteout("gone"),
        opaque("opq"),
        file("opq/after", "same layer as the opaque marker: stays"),
        file("etc/passwd", "root:x:0:0:root:/root:/bin/sh\nuser:x:1000:1000::/home/user:/bin/sh\n"),
        directory("gnu"),
        directory("gnu/" + "L" * 110),
        file("gnu/" + "L" * 110 + "/" + "N" * 120, "GNU long name"),
        symlink("gnu/longlink", "T" * 150),
        directory("big"),
        file("big/random.bin", random.Random(20261202).randbytes(STORE_BIG_SIZE), mode=0o600),
    ]
    layer3 = [
        directory("etc/obsolete"),
        file("etc/obsolete/back", "a directory where a file was whited out\n"),
        file("bin/new", "added in layer 3\n", mode=0o755),
    ]
    return [
        builder.make_layer_tar(layer1, format="pax"),
        builder.make_layer_tar(layer2, format="gnu"),
        builder.make_layer_tar(layer3, format="pax"),
    ]


# --------------------------------------------------------------------------- catalog

BUILDERS: dict[str, Callable[[Path], tuple[Path, str]]] = {
    "basic": build_basic,
    "edge": build_edge,
    "portable": build_portable,
    "store": build_store,
}
SHAPES = ("oci", "oci-archive", "docker-archive", "docker25", "containerd")


@dataclass(frozen=True)
class BuiltImage:
    name: str
    layout: Path
    tag: str

    @property
    def docker_name(self) -> str:
        """The name stored in the image's ``docker save`` shapes."""
        return f"imagefs-test/{self.name}:{self.tag}"


class ImageShapes(Mapping[str, str]):
    """SOURCE strings for one image in every shape, converted on first access."""

    def __init__(self, image: BuiltImage, workdir: Path) -> None:
        self.image = image
        self.workdir = workdir
        self._sources: dict[str, str] = {}

    def __getitem__(self, shape: str) -> str:
        if shape not in SHAPES:
            raise KeyError(shape)
        if shape not in self._sources:
            self._sources[shape] = self._convert(shape)
        return self._sources[shape]

    def __iter__(self) -> Iterator[str]:
        return iter(SHAPES)

    def __len__(self) -> int:
        return len(SHAPES)

    def _convert(self, shape: str) -> str:
        image = self.image
        if shape == "oci":
            return f"oci:{image.layout}:{image.tag}"
        self.workdir.mkdir(parents=True, exist_ok=True)
        tar = self.workdir / f"{image.name}.{shape}.tar"
        if shape == "oci-archive":
            builder.to_oci_archive(image.layout, image.tag, tar)
            return f"oci-archive:{tar}:{image.tag}"
        convert = {
            "docker-archive": builder.to_docker_archive,
            "docker25": builder.to_docker25_archive,
            "containerd": builder.to_containerd_archive,
        }[shape]
        convert(image.layout, image.tag, tar, image.docker_name)
        return f"docker-archive:{tar}:{image.docker_name}"


ShapesFor = Callable[[BuiltImage], ImageShapes]


class Catalog:
    """The catalog images of one session: each built, converted, unpacked once."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self._images: dict[str, BuiltImage] = {}
        self._shapes: dict[str, ImageShapes] = {}
        self._oracles: dict[str, oracle.Oracle] = {}

    def image(self, name: str) -> BuiltImage:
        if name not in self._images:
            layout, tag = BUILDERS[name](self._fresh(name, "image"))
            self._images[name] = BuiltImage(name, layout, tag)
        return self._images[name]

    def shapes(self, image: BuiltImage) -> ImageShapes:
        if image.name not in self._shapes:
            self._shapes[image.name] = ImageShapes(image, self.workdir / image.name / "shapes")
        return self._shapes[image.name]

    def oracle(self, name: str) -> oracle.Oracle:
        if name not in self._oracles:
            image = self.image(name)
            bundle = self._fresh(name, "umoci") / "bundle"
            self._oracles[name] = oracle.umoci_oracle(image.layout, image.tag, bundle)
        return self._oracles[name]

    def _fresh(self, name: str, purpose: str) -> Path:
        path = self.workdir / name / purpose
        path.mkdir(parents=True)
        return path
