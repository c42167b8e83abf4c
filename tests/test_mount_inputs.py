"""Mount-level checks for inputs umoci cannot judge, and for input selection.

Where umoci is no oracle (old GNU sparse members make it fail; it drops
``security.selinux``), the mounted tree is checked against what the test
wrote into the layer, byte for byte.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import stat
import tarfile
from pathlib import Path

from tests import builder
from tests.builder import Member, directory, file, symlink
from tests.mounting import is_mounted, mounted, run_imagefs
from tests.needs import require_fuse, require_tools

SPARSE = b"head" + bytes(1 << 20) + b"middle" + bytes(3 << 20) + b"tail"


def test_old_gnu_sparse_and_xattrs_umoci_cannot_unpack(tmp_path: Path) -> None:
    require_tools("tar")
    layer = builder.make_layer_tar(
        [
            directory("d"),
            Member("d/sparse", "file", SPARSE, sparse=True),
            file("d/plain", "x" * 5000),
        ],
        format="gnu",
    )
    xattr_layer = builder.make_layer_tar(
        [
            symlink("d/link", "plain", xattrs={"trusted.on-link": b"v"}),
            file("d/labelled", "l", xattrs={"security.selinux": b"system_u:object_r:x:s0\0"}),
        ]
    )
    layout = builder.write_oci_layout(
        tmp_path / "layout", [layer, xattr_layer], compression=["zstd", "gzip"], tag="t"
    )
    with mounted(f"oci:{layout}:t", tmp_path / "mnt") as mnt:
        sparse = mnt / "d" / "sparse"
        assert sparse.stat().st_size == len(SPARSE)
        assert hashlib.sha256(sparse.read_bytes()).digest() == hashlib.sha256(SPARSE).digest()
        with sparse.open("rb") as handle:
            handle.seek((1 << 20) + 4)
            assert handle.read(6) == b"middle"
        assert os.getxattr(mnt / "d" / "link", "trusted.on-link", follow_symlinks=False) == b"v"
        assert (
            os.getxattr(mnt / "d" / "labelled", "security.selinux") == b"system_u:object_r:x:s0\0"
        )


def test_platform_and_image_selection(tmp_path: Path) -> None:
    amd = builder.make_layer_tar([file("arch", "amd64\n")])
    arm = builder.make_layer_tar([file("arch", "arm64\n")])
    layout = builder.write_multiplatform_layout(
        tmp_path / "layout",
        {("linux", "amd64", ""): [amd], ("linux", "arm64", "v8"): [arm]},
        tag="multi",
    )
    with mounted(f"{layout}:multi", tmp_path / "a", "--platform", "linux/arm64") as mnt:
        assert (mnt / "arch").read_text() == "arm64\n"
    with mounted(f"oci:{layout}:multi", tmp_path / "b", "-o", "platform=linux/amd64") as mnt:
        assert (mnt / "arch").read_text() == "amd64\n"
    (tmp_path / "c").mkdir()
    result = run_imagefs(
        "mount", "--platform", "linux/s390x", f"oci:{layout}:multi", tmp_path / "c"
    )
    assert result.returncode == 1
    assert "linux/amd64" in result.stderr and "linux/arm64" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def merge_docker_archives(archives: list[Path], dest: Path) -> Path:
    """One legacy ``docker save`` tar holding every image of ``archives``."""
    manifest: list[object] = []
    seen: set[str] = set()
    with tarfile.open(dest, "w") as out:
        for archive in archives:
            with tarfile.open(archive) as source:
                for member in source.getmembers():
                    if member.name == "manifest.json":
                        extracted = source.extractfile(member)
                        assert extracted is not None
                        manifest.extend(json.load(extracted))
                    elif member.name not in seen and member.name != "repositories":
                        seen.add(member.name)
                        data = source.extractfile(member) if member.isfile() else None
                        out.addfile(member, data)
        payload = json.dumps(manifest).encode()
        info = tarfile.TarInfo("manifest.json")
        info.size = len(payload)
        out.addfile(info, io.BytesIO(payload))
    return dest


def test_image_selection_in_multi_image_archive(tmp_path: Path) -> None:
    require_tools("skopeo")
    archives = []
    for name in ("one", "two"):
        layout = builder.write_oci_layout(
            tmp_path / name, [builder.make_layer_tar([file("which", name)])], tag="t"
        )
        archives.append(
            builder.to_docker_archive(layout, "t", tmp_path / f"{name}.tar", f"example/{name}:t")
        )
    both = merge_docker_archives(archives, tmp_path / "both.tar")
    with mounted(both, tmp_path / "a", "--image", "example/two:t") as mnt:
        assert (mnt / "which").read_text() == "two"
    with mounted(f"docker-archive:{both}:example/one:t", tmp_path / "b") as mnt:
        assert (mnt / "which").read_text() == "one"
    (tmp_path / "c").mkdir()
    result = run_imagefs("mount", both, tmp_path / "c")
    assert result.returncode == 1 and "example/one" in result.stderr, result.stderr


def broken_sources(tmp_path: Path) -> dict[str, tuple[str, str]]:
    """name -> (SOURCE, a word the one-line error must contain)."""
    good = builder.write_oci_layout(
        tmp_path / "good", [builder.make_layer_tar([file("a", "a")])], tag="t"
    )
    cases: dict[str, tuple[str, str]] = {}

    missing_blob = builder.write_oci_layout(
        tmp_path / "missing", [builder.make_layer_tar([file("a", "a")])], tag="t"
    )
    layer_digest = builder.image_manifest(missing_blob, "t")["layers"][0]["digest"]
    builder.blob_path(missing_blob, layer_digest).unlink()
    cases["missing blob"] = (f"oci:{missing_blob}:t", layer_digest.split(":")[1][:12])

    bad_json = tmp_path / "badjson"
    shutil.copytree(good, bad_json)
    (bad_json / "index.json").write_text("{not json")
    cases["broken index"] = (f"oci:{bad_json}:t", "index.json")

    unknown = builder.write_oci_layout(
        tmp_path / "unknown", [builder.make_layer_tar([file("a", "a")])], tag="t"
    )
    manifest_desc = builder.manifest_descriptor(unknown, "t")
    manifest = builder.image_manifest(unknown, "t")
    manifest["layers"][0]["mediaType"] = "application/vnd.example.weird"
    new_desc = builder.write_json_blob(unknown, manifest, manifest_desc["mediaType"])
    builder.set_tag(unknown, new_desc, "t")
    cases["unknown media type"] = (f"oci:{unknown}:t", "application/vnd.example.weird")

    truncated = builder.write_oci_layout(
        tmp_path / "trunc",
        [builder.make_layer_tar([file("a", os.urandom(100_000))])],
        compression="none",
        tag="t",
    )
    blob = builder.blob_path(
        truncated, builder.image_manifest(truncated, "t")["layers"][0]["digest"]
    )
    blob.chmod(0o644)
    blob.write_bytes(blob.read_bytes()[:50_000])
    cases["truncated tar"] = (f"oci:{truncated}:t", "sha256")

    junk = tmp_path / "junk.tar"
    junk.write_bytes(b"\x00" * 10 + b"garbage" * 1000)
    cases["not an image"] = (str(junk), "junk.tar")
    return cases


def test_broken_inputs_give_one_line_errors_and_mount_nothing(tmp_path: Path) -> None:
    require_fuse()
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    for name, (source, word) in broken_sources(tmp_path).items():
        result = run_imagefs("mount", "--quiet", source, mnt)
        lines = result.stderr.strip().splitlines()
        assert result.returncode == 1, f"{name}: {result.stderr}"
        assert len(lines) == 1 and lines[0].startswith("imagefs: "), f"{name}: {result.stderr}"
        assert word in lines[0], f"{name}: {lines[0]}"
        assert not is_mounted(mnt), name


def test_file_modes_survive_through_the_kernel(tmp_path: Path) -> None:
    layer = builder.make_layer_tar(
        [
            file("suid", "s", mode=0o4755),
            file("sgid", "g", mode=0o2711),
            directory("sticky", mode=0o1777),
            Member("fifo", "fifo"),
            Member("blk", "block", devmajor=8, devminor=1),
            # Bazel writes symlinks with mode 0755; Linux shows every symlink as 0777.
            symlink("bazel-link", "suid", mode=0o755),
        ]
    )
    layout = builder.write_oci_layout(tmp_path / "l", [layer], compression="none", tag="t")
    with mounted(f"oci:{layout}:t", tmp_path / "mnt") as mnt:
        assert stat.S_IMODE(os.lstat(mnt / "bazel-link").st_mode) == 0o777
        assert os.readlink(mnt / "bazel-link") == "suid"
        assert stat.S_IMODE(os.lstat(mnt / "suid").st_mode) == 0o4755
        assert stat.S_IMODE(os.lstat(mnt / "sgid").st_mode) == 0o2711
        assert stat.S_IMODE(os.lstat(mnt / "sticky").st_mode) == 0o1777
        assert stat.S_ISFIFO(os.lstat(mnt / "fifo").st_mode)
        blk = os.lstat(mnt / "blk")
        assert stat.S_ISBLK(blk.st_mode) and (os.major(blk.st_rdev), os.minor(blk.st_rdev)) == (
            8,
            1,
        )
