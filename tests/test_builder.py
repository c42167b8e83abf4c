"""The fixture builder, the catalog images and the oracle check themselves.

If these fail, every comparison test built on them means nothing: the layer
tars must say what the members say, every catalog image must unpack with
umoci and show its features, every converted shape must be readable by
skopeo and hold what the real tool writes, and compare() must see changes.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import random
import shutil
import tarfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import pytest

from tests import builder, images
from tests.builder import NS, Member, directory, file, hardlink, opaque, symlink, whiteout
from tests.engines import Skopeo, run
from tests.images import BuiltImage, ImageShapes, ShapesFor
from tests.oracle import Oracle, Record, compare, snapshot, umoci_oracle, umoci_unpack

Test = TypeVar("Test", bound=Callable[..., None])


def tools(test: Test) -> Test:
    """Mark a test that runs umoci, skopeo or GNU tar itself (skips without them)."""
    marked: Test = pytest.mark.tools(pytest.mark.usefixtures("image_tools")(test))
    return marked


def sha256(data: bytes | str) -> str:
    return hashlib.sha256(data.encode() if isinstance(data, str) else data).hexdigest()


def read_tar(data: bytes) -> list[tuple[tarfile.TarInfo, bytes | None]]:
    with tarfile.open(fileobj=io.BytesIO(data)) as tf:
        return [(info, _content(tf, info)) for info in tf.getmembers()]


def _content(tf: tarfile.TarFile, info: tarfile.TarInfo) -> bytes | None:
    reader = tf.extractfile(info) if info.isreg() else None
    return reader.read() if reader else None


def skopeo_inspect(source: str, *extra: str) -> dict[str, Any]:
    return Skopeo().inspect(source, *extra)


def outer_tar(path: Path) -> dict[str, bytes]:
    """Member name -> bytes (symlinks as b"-> target"), in archive order."""
    members = {}
    with tarfile.open(path) as tf:
        for info in tf.getmembers():
            reader = tf.extractfile(info) if info.isreg() else None
            members[info.name] = reader.read() if reader else f"-> {info.linkname}".encode()
    return members


# --------------------------------------------------------------------------- layer tars


def test_members_round_trip_through_tarfile() -> None:
    layer = builder.make_layer_tar(
        [
            directory("./", mode=0o711),
            file("etc/f", "data", mode=0o4750, uid=7, gid=8, uname="u", gname="g"),
            file("t", mtime_ns=1_500_000_000_123_456_789),
            symlink("s", "/abs/target"),
            hardlink("h", "etc/f"),
            Member("c", "char", devmajor=1, devminor=3),
            Member("b", "block", devmajor=8, devminor=1),
            Member("p", "fifo"),
            file("x", xattrs={"user.bin": b"\x00\xff\x80", "trusted.t": b"t"}),
        ]
    )
    assert len(layer) % tarfile.RECORDSIZE == 0
    got = {info.name: (info, data) for info, data in read_tar(layer)}
    info, data = got["etc/f"]
    assert (info.mode, info.uid, info.gid, info.uname, info.gname, data) == (
        0o4750,
        7,
        8,
        "u",
        "g",
        b"data",
    )
    assert got["."][0].isdir() and got["."][0].mode == 0o711
    # The exact decimal, not a float that lost the nanoseconds.
    assert got["t"][0].pax_headers["mtime"] == "1500000000.123456789"
    assert got["s"][0].issym() and got["s"][0].linkname == "/abs/target"
    assert got["h"][0].islnk() and got["h"][0].linkname == "etc/f"
    assert (got["c"][0].ischr(), got["c"][0].devmajor, got["c"][0].devminor) == (True, 1, 3)
    assert got["b"][0].isblk() and got["p"][0].isfifo()
    assert b"SCHILY.xattr.user.bin=\x00\xff\x80\n" in layer
    assert got["x"][0].pax_headers["SCHILY.xattr.trusted.t"] == "t"


def test_duplicates_and_order_are_kept() -> None:
    layer = builder.make_layer_tar([file("a", "1"), whiteout("a"), file("a", "2")])
    assert [(info.name, data) for info, data in read_tar(layer)] == [
        ("a", b"1"),
        (".wh.a", b""),
        ("a", b"2"),
    ]


def test_whiteout_and_opaque_names() -> None:
    assert whiteout("etc/passwd").name == "etc/.wh.passwd"
    assert whiteout("top/").name == ".wh.top"
    assert opaque("var/lib/").name == "var/lib/.wh..wh..opq"


def test_gnu_format_writes_long_name_records() -> None:
    name, target = "d/" + "n" * 150, "t" * 150
    layer = builder.make_layer_tar([file(name), hardlink("h" * 120, name)], format="gnu")
    assert layer.count(b"././@LongLink") == 3  # the name, the link's name, its target
    assert [info.name for info, _ in read_tar(layer)] == [name, "h" * 120]
    with pytest.raises(ValueError, match="format='pax'"):
        builder.make_layer_tar([symlink("s", target, xattrs={"user.a": b"1"})], format="gnu")
    with pytest.raises(ValueError, match="format='pax'"):
        builder.make_layer_tar([file("f", mtime_ns=NS + 1)], format="ustar")


@tools
@pytest.mark.parametrize(("fmt", "marker"), [("pax", b"GNU.sparse.major"), ("gnu", b"")])
def test_sparse_members_keep_their_content(fmt: builder.TarFormat, marker: bytes) -> None:
    data = images.sparse_data()
    layer = builder.make_layer_tar([file("before"), Member("s", data=data, sparse=True)], fmt)
    assert marker in layer
    assert len(layer) < len(data) // 10  # the holes are not stored
    (_, before), (info, content) = read_tar(layer)
    assert before == b""
    assert info.issparse() and info.name == "s" and content == data


# --------------------------------------------------------------------------- OCI layouts


def check_layout(layout: Path, tag: str, compressions: list[str], layers: list[bytes]) -> None:
    assert json.loads((layout / "oci-layout").read_text()) == {"imageLayoutVersion": "1.0.0"}
    descriptor = builder.tag_descriptor(layout, tag)
    manifest_bytes = builder.blob_path(layout, descriptor["digest"]).read_bytes()
    assert builder.sha256_digest(manifest_bytes) == descriptor["digest"]
    assert len(manifest_bytes) == descriptor["size"]
    manifest = json.loads(manifest_bytes)
    config = builder.read_json_blob(layout, manifest["config"])
    assert config["rootfs"]["diff_ids"] == [builder.sha256_digest(tar) for tar in layers]
    assert len(config["history"]) == len(layers)
    for layer, method, tar in zip(manifest["layers"], compressions, layers, strict=True):
        blob = builder.blob_path(layout, layer["digest"]).read_bytes()
        assert builder.sha256_digest(blob) == layer["digest"] and len(blob) == layer["size"]
        assert layer["mediaType"] == builder.OCI_LAYER[method]
        assert builder.decompress(blob) == tar
    assert builder.layer_compressions(layout, tag) == compressions


def test_write_oci_layout(tmp_path: Path) -> None:
    layers = [builder.make_layer_tar([file(f"f{i}", str(i))]) for i in range(3)]
    methods: list[builder.Compression] = ["none", "gzip", "zstd"]
    layout = builder.write_oci_layout(tmp_path / "l", layers, compression=methods, tag="v1")
    check_layout(layout, "v1", list(methods), layers)
    index = json.loads((layout / "index.json").read_text())
    assert [m["annotations"][builder.REF_NAME] for m in index["manifests"]] == ["v1"]


def test_tags_and_platform_indexes(tmp_path: Path) -> None:
    layout = tmp_path / "l"
    amd64 = [builder.make_layer_tar([file("arch", "amd64")])]
    arm64 = [builder.make_layer_tar([file("arch", "arm64")])]
    arm = ("linux", "arm64", "v8")
    builder.write_multiplatform_layout(
        layout, {builder.DEFAULT_PLATFORM: amd64, arm: arm64}, tag="multi"
    )
    builder.write_oci_layout(layout, amd64, tag="single")
    builder.add_tag(layout, "single", "alias")
    index = json.loads((layout / "index.json").read_text())
    assert sorted(m["annotations"][builder.REF_NAME] for m in index["manifests"]) == [
        "alias",
        "multi",
        "single",
    ]
    platforms = builder.read_json_blob(layout, builder.tag_descriptor(layout, "multi"))
    assert [m["platform"] for m in platforms["manifests"]] == [
        {"architecture": "amd64", "os": "linux"},
        {"architecture": "arm64", "os": "linux", "variant": "v8"},
    ]
    check_layout(layout, "single", ["gzip"], amd64)


@tools
def test_skopeo_reads_written_layouts(tmp_path: Path) -> None:
    layout = tmp_path / "l"
    layer = builder.make_layer_tar([file("a")])
    builder.write_multiplatform_layout(
        layout, {builder.DEFAULT_PLATFORM: [layer], ("linux", "arm64", ""): [layer]}, tag="m"
    )
    builder.write_oci_layout(layout, [layer], compression="zstd", tag="z")
    builder.add_tag(layout, "z", "z2")
    arm = skopeo_inspect(f"oci:{layout}:m", "--override-arch", "arm64")
    assert arm["Architecture"] == "arm64"
    assert (
        skopeo_inspect(f"oci:{layout}:z2")["Digest"]
        == builder.tag_descriptor(layout, "z")["digest"]
    )


# --------------------------------------------------------------------------- umoci


@tools
def test_umoci_build_makes_one_layer_per_step(basic_image: BuiltImage) -> None:
    tars = list(builder.layer_tars(basic_image.layout, basic_image.tag))
    names = [[info.name for info, _ in read_tar(tar)] for tar in tars]
    assert len(names) == 3
    assert {"etc/.wh.obsolete", "etc/.wh.obsolete-dir", "opt/.wh.old"} <= set(names[1])
    # umoci's own quirk, kept on purpose: a whiteout below a same-layer symlink.
    assert {"srv/cache", "srv/cache/.wh.item"} <= set(names[2])
    assert builder.layer_compressions(basic_image.layout, basic_image.tag) == ["gzip"] * 3


@tools
def test_umoci_unpack_converts_other_compressions(tmp_path: Path) -> None:
    layers = [builder.make_layer_tar([file("a", "plain")]), builder.make_layer_tar([file("b")])]
    layout = builder.write_oci_layout(tmp_path / "l", layers, compression=["none", "zstd"])
    rootfs = umoci_unpack(layout, "latest", tmp_path / "bundle")
    assert (rootfs / "a").read_text() == "plain" and (rootfs / "b").exists()


@tools
def test_umoci_unpack_refuses_to_be_an_unfaithful_oracle(tmp_path: Path) -> None:
    selinux = {"security.selinux": b"system_u:object_r:etc_t:s0"}
    layout = builder.write_oci_layout(
        tmp_path / "l", [builder.make_layer_tar([file("f", xattrs=selinux)])]
    )
    with pytest.raises(RuntimeError, match=r"security\.selinux"):
        umoci_unpack(layout, "latest", tmp_path / "bundle")


@tools
def test_to_gzip_layout(edge_image: BuiltImage, tmp_path: Path) -> None:
    layout = builder.to_gzip_layout(edge_image.layout, edge_image.tag, tmp_path / "gz")
    assert builder.layer_compressions(layout, edge_image.tag) == ["gzip"] * 3
    assert list(builder.layer_tars(layout, edge_image.tag)) == list(
        builder.layer_tars(edge_image.layout, edge_image.tag)
    )


# --------------------------------------------------------------------------- catalog images


def content(records: dict[str, Record], path: str) -> str | None:
    return records[path].sha256


@tools
def test_basic_image_features(basic_oracle: Oracle) -> None:
    r = basic_oracle.records
    for gone in (*images.BASIC_DELETED, "etc/obsolete-dir/conf", "opt/old/sub", "srv/cache/item"):
        assert gone not in r, gone
    recreated_file, recreated_dir = images.BASIC_RECREATED
    assert content(r, recreated_file) == sha256("back again\n")
    assert r[recreated_dir].type == "dir" and f"{recreated_dir}/new" in r
    assert r["etc/motd"].type == "dir" and r["etc/motd/00-welcome"].type == "file"
    assert (r["srv/cache"].type, r["srv/cache"].target) == ("symlink", "/var/cache")
    assert content(r, "etc/passwd") == sha256(
        "root:x:0:0:root:/root:/bin/sh\nuser:x:1000:1000::/home/user:/bin/sh\n"
    )
    assert (r["etc/shadow"].mode, r["etc/shadow"].gid) == (0o600, 42)
    for path in images.BASIC_HARDLINKS:
        assert r[path].links == images.BASIC_HARDLINKS and r[path].nlink == 2
    modes = {"bin/suid": 0o4755, "bin/sgid": 0o2755, "var/tmp": 0o1777, "srv/shared": 0o2775}
    assert {path: r[path].mode for path in modes} == modes
    assert (r["home/user"].uid, r["home/user"].gid, r["home/user"].mode) == (1000, 1000, 0o700)
    assert (r["srv/data.bin"].uid, r["srv/data.bin"].gid) == (12345, 12345)
    targets = {"bin/rel": "tool", "etc/abs": "/etc/passwd", "usr/bin": "../bin"}
    assert {path: r[path].target for path in targets} == targets
    assert r["dangling"].target == "/nonexistent/target"
    assert r["run/fifo"].type == "fifo"
    assert (r["dev/null"].type, r["dev/null"].rdev, r["dev/null"].mode) == ("char", (1, 3), 0o666)
    readme, mtime_ns = images.BASIC_SUBSECOND
    assert dict(r[readme].xattrs) == {
        "user.comment": b"hello",
        "user.binary": b"\x00\x01\xfe\xff",
        "trusted.note": b"trusted",
    }
    assert dict(r["usr/share/doc"].xattrs) == {"user.dir": b"a directory xattr"}
    assert r[readme].mtime_ns == round(mtime_ns / NS) * NS  # umoci repack rounds
    assert len(images.BASIC_LONG_PATH.encode()) > 255 and images.BASIC_LONG_PATH in r
    assert images.BASIC_UTF8_NAME in r
    # Everything in a umoci-built image has an entry: every mtime is known.
    assert all(record.mtime_ns is not None for record in r.values())


@tools
def test_edge_image_layers(edge_image: BuiltImage) -> None:
    layout, tag = edge_image.layout, edge_image.tag
    assert builder.layer_compressions(layout, tag) == ["none", "gzip", "zstd"]
    first, second, third = builder.layer_tars(layout, tag)
    assert b"././@LongLink" in second and b"././@LongLink" not in first
    assert b"SCHILY.xattr.user.mime" in first and b"GNU.sparse.major" in third


@tools
def test_edge_image_features(edge_oracle: Oracle) -> None:
    r = edge_oracle.records
    absent = ["opq/lower", "opq/lowerdir", "wh/file", "wh/dir/a", "nonexistent", "nothere"]
    absent += ["tree/sub", "samelayer/old", "hl/orig"]
    assert [path for path in absent if path in r] == []
    assert (r[""].mode, r[""].mtime_ns) == (images.EDGE_ROOT_MODE, builder.DEFAULT_MTIME_NS)
    # opaque: same-layer children stay; the directory keeps its lower metadata
    assert {"opq/before", "opq/after", "opq/newdir"} <= r.keys()
    assert r["opq"].mtime_ns == 1_100_000_000 * NS
    assert r["fresh/only"].type == "file"
    assert (r["wh/dir"].type, r["wh/stays"].type) == ("file", "file")
    assert (r["tree"].type, r["was_file"].type, r["was_file/child"].type) == ("file", "dir", "file")
    assert (r["samelayer"].type, r["swap"].type, r["swap/kid"].type) == ("file", "dir", "file")
    assert r["swap2"].type == "file"
    assert (r["keepkids"].mode, r["keepkids"].mtime_ns) == (0o700, 1_300_000_000 * NS)
    assert "keepkids/kid" in r
    implied = r["implied/a"]
    assert (implied.type, implied.mode, implied.uid, implied.mtime_ns) == ("dir", 0o755, 0, None)
    assert (r["dup"].mode, content(r, "dup")) == (0o640, sha256("second, wins"))
    trio = ("links/second", "links/target", "links/third")
    assert {(r[p].links, r[p].nlink, r[p].uid) for p in trio} == {(trio, 3, 1000)}
    assert (r["hl/alias"].nlink, r["hl/alias"].links) == (1, None)
    assert content(r, "relink/l") == sha256("first content")
    assert content(r, "relink/t") == sha256("second content")
    assert dict(r["xattr/file"].xattrs) == {"user.new": b"only this"}
    assert dict(r["xattr"].xattrs) == {"user.dir": b"on a directory", "trusted.dir": b"t"}
    assert dict(r["xattr/link"].xattrs) == {"trusted.link": b"on a symlink"}
    devices = {p: (r[p].type, r[p].rdev, r[p].mode) for p in ("dev/null", "dev/loop7")}
    assert devices == {"dev/null": ("char", (1, 3), 0o666), "dev/loop7": ("block", (7, 7), 0o660)}
    assert (r["run/fifo"].type, r["run/fifo"].mode) == ("fifo", 0o622)
    modes = {"perm/suid": 0o4755, "perm/sgid": 0o2751, "perm/sticky": 0o1777, "perm/none": 0}
    assert {path: r[path].mode for path in modes} == modes
    base = images.EDGE_SUBSECOND_NS
    times = {"times/subsec": base, "times/link": base + 111, "times/dir": base + 222}
    times |= {"times": base + 333, "times/epoch": 0}
    assert {path: r[path].mtime_ns for path in times} == times
    assert (r["owners/big"].uid, r["owners/big"].gid) == (3_000_000, 3_000_001)
    assert content(r, "dotted/file") == sha256("replaced without the ./ prefix")
    assert {"slash/file", "names/with space é ü 日本語", images.EDGE_PAX_LONG_NAME} <= r.keys()
    assert r["paxlong/link"].target == "t" * 400 and r["gnu/longlink"].target == "T" * 200
    assert r[images.EDGE_GNU_LONG_NAME].links == (
        images.EDGE_GNU_LONG_NAME,
        "gnu/hard-" + "H" * 120,
    )
    assert r[images.EDGE_SPARSE].sha256 == sha256(images.sparse_data())
    big = random.Random(20240601).randbytes(images.EDGE_BIG_SIZE)
    assert (r[images.EDGE_BIG].size, r[images.EDGE_BIG].sha256) == (len(big), sha256(big))


# --------------------------------------------------------------------------- snapshot, compare


def record(**changes: Any) -> Record:
    fields: dict[str, Any] = {"type": "file", "mode": 0o644, "uid": 0, "gid": 0}
    fields |= {"mtime_ns": NS, "nlink": 1, "size": 1, "sha256": "ab"}
    return Record(**(fields | changes))


def test_compare_reports_each_difference() -> None:
    expected = {"": record(type="dir"), "a": record(), "gone": record()}
    actual = {
        "": record(type="dir", mtime_ns=2 * NS),
        "a": record(mode=0o600, xattrs=(("user.x", b"1"),)),
        "new": record(),
    }
    assert compare(expected, actual) == [
        "gone: missing",
        "new: unexpected",
        "<root>: mtime_ns 1000000000 != 2000000000",
        "a: mode 0644 != 0600",
        "a: xattrs {} != {user.x=b'1'}",
    ]
    assert compare(expected, actual, ignore={"dir.mtime_ns", "mode", "xattrs"}) == [
        "gone: missing",
        "new: unexpected",
    ]
    assert compare({"a": record()}, {"a": record(type="dir")}) == ["a: type file != dir"]
    with pytest.raises(ValueError, match="unknown fields"):
        compare({}, {}, ignore={"mtime"})


def test_compare_skips_unknown_mtimes_and_dir_link_counts() -> None:
    expected = {"d": record(type="dir", mtime_ns=None, nlink=2)}
    assert compare(expected, {"d": record(type="dir", mtime_ns=5, nlink=1)}) == []
    assert compare(expected, {"d": record(type="dir", nlink=1)}, ignore=()) == ["d: nlink 2 != 1"]


@tools
def test_compare_sees_changes_to_a_copy(basic_oracle: Oracle, tmp_path: Path) -> None:
    copy = tmp_path / "copy"
    run(["cp", "-a", str(basic_oracle.rootfs), str(copy)])
    assert compare(basic_oracle.records, snapshot(copy), ignore=()) == []
    os.chmod(copy / "etc/passwd", 0o600)
    (copy / images.BASIC_UTF8_NAME).unlink()
    (copy / "extra").write_text("x")
    hardlink_copy = copy / images.BASIC_HARDLINKS[1]
    hardlink_copy.unlink()
    shutil.copy2(copy / images.BASIC_HARDLINKS[0], hardlink_copy)
    os.setxattr(copy / images.BASIC_SUBSECOND[0], "user.comment", b"changed")
    (copy / "bin/rel").unlink()
    (copy / "bin/rel").symlink_to("elsewhere")
    problems = compare(basic_oracle.records, snapshot(copy), ignore={"mtime_ns"})
    assert problems == [
        f"{images.BASIC_UTF8_NAME}: missing",
        "extra: unexpected",
        "bin/rel: size 4 != 9",
        "bin/rel: target 'tool' != 'elsewhere'",
        "bin/tool: nlink 2 != 1",
        "bin/tool: links ('bin/tool', 'bin/tool-hardlink') != None",
        "bin/tool-hardlink: nlink 2 != 1",
        "bin/tool-hardlink: links ('bin/tool', 'bin/tool-hardlink') != None",
        "etc/passwd: mode 0644 != 0600",
        f"{images.BASIC_SUBSECOND[0]}: xattrs {{trusted.note=b'trusted', "
        "user.binary=b'\\x00\\x01\\xfe\\xff', user.comment=b'hello'} != "
        "{trusted.note=b'trusted', user.binary=b'\\x00\\x01\\xfe\\xff', "
        "user.comment=b'changed'}",
    ]


# --------------------------------------------------------------------------- shapes


@tools
@pytest.mark.parametrize("shape", images.SHAPES)
def test_skopeo_reads_every_shape(
    basic_image: BuiltImage, image_shapes: ShapesFor, shape: str, tmp_path: Path
) -> None:
    """skopeo reads each shape back to the same layers (same diff_ids)."""
    source = image_shapes(basic_image)[shape]
    layout = tmp_path / "back"
    builder.skopeo_copy(source, f"oci:{layout}:back")
    diff_ids = [builder.sha256_digest(tar) for tar in builder.layer_tars(layout, "back")]
    original = list(builder.layer_tars(basic_image.layout, basic_image.tag))
    assert diff_ids == [builder.sha256_digest(tar) for tar in original]


@tools
def test_converted_edge_image_unpacks_the_same(
    edge_image: BuiltImage, edge_oracle: Oracle, image_shapes: ShapesFor, tmp_path: Path
) -> None:
    source = image_shapes(edge_image)["containerd"]
    builder.skopeo_copy(source, f"oci:{tmp_path / 'back'}:back")
    back = umoci_oracle(tmp_path / "back", "back", tmp_path / "bundle")
    assert compare(edge_oracle.records, back.records) == []


def shape_tar(shapes: ImageShapes, shape: str) -> Path:
    path = shapes[shape].split(":", 2)[1]
    return Path(path)


@tools
def test_docker25_shape(edge_image: BuiltImage, image_shapes: ShapesFor) -> None:
    members = outer_tar(shape_tar(image_shapes(edge_image), "docker25"))
    names = list(members)
    assert names[:2] == ["blobs", "blobs/sha256"]
    assert names[-4:] == ["index.json", "manifest.json", "oci-layout", "repositories"]
    assert names == names[:2] + sorted(names[2:])
    (entry,) = json.loads(members["manifest.json"])
    assert entry["RepoTags"] == [edge_image.docker_name]
    (descriptor,) = json.loads(members["index.json"])["manifests"]
    assert descriptor["annotations"][builder.REF_NAME] == edge_image.tag
    manifest = json.loads(members[builder.blob_member(descriptor)])
    assert entry["Config"] == builder.blob_member(manifest["config"])
    assert entry["Layers"] == [builder.blob_member(layer) for layer in manifest["layers"]]
    config = json.loads(members[entry["Config"]])
    for layer, diff_id in zip(manifest["layers"], config["rootfs"]["diff_ids"], strict=True):
        blob = members[builder.blob_member(layer)]
        assert layer["mediaType"] == builder.OCI_LAYER["none"]
        assert layer["digest"] == diff_id == builder.sha256_digest(blob)
        assert blob[257:262] == b"ustar"  # uncompressed


@tools
def test_containerd_shape(edge_image: BuiltImage, image_shapes: ShapesFor) -> None:
    members = outer_tar(shape_tar(image_shapes(edge_image), "containerd"))
    names = list(members)
    blobs = [name for name in names if name.startswith("blobs/sha256/")]
    assert names.index("manifest.json") > max(names.index(blob) for blob in blobs)
    (top,) = json.loads(members["index.json"])["manifests"]
    assert top["mediaType"] == builder.OCI_INDEX
    assert top["annotations"]["io.containerd.image.name"] == f"docker.io/{edge_image.docker_name}"
    platforms = json.loads(members[builder.blob_member(top)])["manifests"]
    assert [p["platform"]["architecture"] for p in platforms] == ["amd64", "arm64"]
    assert builder.blob_member(platforms[1]) not in members  # the other platform is missing
    manifest = json.loads(members[builder.blob_member(platforms[0])])
    original = builder.image_manifest(edge_image.layout, edge_image.tag)
    assert manifest == original  # compressed blobs kept as they are
    (entry,) = json.loads(members["manifest.json"])
    assert entry["Layers"] == [builder.blob_member(layer) for layer in manifest["layers"]]
    assert all(builder.blob_member(layer) in members for layer in manifest["layers"])


@tools
def test_legacy_docker_archive_shape(edge_image: BuiltImage, image_shapes: ShapesFor) -> None:
    members = outer_tar(shape_tar(image_shapes(edge_image), "docker-archive"))
    (entry,) = json.loads(members["manifest.json"])
    assert len(entry["Layers"]) == 3
    links = [name for name in members if name.endswith("/layer.tar")]
    assert len(links) == 3 and all(members[name].startswith(b"-> ../") for name in links)
    for layer in entry["Layers"]:
        assert members[layer][257:262] == b"ustar"


@tools
def test_oci_archive_shape(edge_image: BuiltImage, image_shapes: ShapesFor) -> None:
    members = outer_tar(shape_tar(image_shapes(edge_image), "oci-archive"))
    assert {"oci-layout", "index.json"} <= members.keys()
    (descriptor,) = json.loads(members["index.json"])["manifests"]
    manifest = json.loads(members[builder.blob_member(descriptor)])
    # skopeo compresses the plain layer and keeps gzip and zstd.
    assert gzip.decompress(members[builder.blob_member(manifest["layers"][0])])[257:262] == b"ustar"
    assert manifest["layers"][2]["mediaType"] == builder.OCI_LAYER["zstd"]


@tools
def test_skopeo_inspects_the_archives(basic_image: BuiltImage, image_shapes: ShapesFor) -> None:
    shapes = image_shapes(basic_image)
    for shape in images.SHAPES:
        assert skopeo_inspect(shapes[shape])["Architecture"] == "amd64", shape


@tools
def test_verbatim_oci_archive_keeps_the_layout(tmp_path: Path) -> None:
    layer = builder.make_layer_tar([file("a", "plain")])
    layout = builder.write_oci_layout(tmp_path / "l", [layer], compression="none", tag="p")
    builder.add_tag(layout, "p", "q")
    tar = builder.to_oci_archive(layout, "p", tmp_path / "a.tar", verbatim=True)
    members = outer_tar(tar)
    assert members["index.json"] == (layout / "index.json").read_bytes()
    manifest = builder.image_manifest(layout, "q")
    assert members[builder.blob_member(manifest["layers"][0])] == layer
    assert skopeo_inspect(f"oci-archive:{tar}:q")["Architecture"] == "amd64"


def test_containerd_shape_of_a_multiplatform_layout(tmp_path: Path) -> None:
    arm = ("linux", "arm64", "")
    layers = {arm: [builder.make_layer_tar([file("arch", "arm64")])]}
    layout = builder.write_multiplatform_layout(tmp_path / "l", layers, tag="m")
    tar = builder.to_containerd_archive(layout, "m", tmp_path / "c.tar", "img:m")
    members = outer_tar(tar)
    (top,) = json.loads(members["index.json"])["manifests"]
    assert top["annotations"]["io.containerd.image.name"] == "docker.io/library/img:m"
    platforms = json.loads(members[builder.blob_member(top)])["manifests"]
    assert [p["platform"]["architecture"] for p in platforms] == ["arm64", "amd64"]
    assert builder.blob_member(platforms[0]) in members
    assert builder.blob_member(platforms[1]) not in members
