"""A docker-archive is trusted through its config's diff_ids, over the uncompressed stream.

go-containerregistry tarballs (crane pull, kaniko --tar-path, ko, apko, jib)
list *compressed* layers, ``<hex>.tar.gz`` named by the compressed bytes'
digest, while the config's ``rootfs.diff_ids`` name the uncompressed tars
(issue #12). The layer's one pass checks both: the name over the compressed
blob, the diff_id over what it decompresses to; each error says which digest
was expected, which was found and over which bytes. A cached index or tree
made for the same blob under another diff_id is never served.
"""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import pytest

from imagefs.errors import DigestMismatchError
from imagefs.sources import open_image
from imagefs.tree.loader import load_image
from imagefs.tree.persisted import load_cached
from tests import builder
from tests.builder import directory, file
from tests.images import BuiltImage
from tests.mounting import mounted, run_imagefs
from tests.oracle import Oracle, compare, snapshot

NAME = "test/img:tag"


@pytest.mark.parametrize("compression", ["gzip", "zstd"])
def test_ggcr_tarball_matches_umoci(
    compression: builder.Compression,
    edge_image: BuiltImage,
    edge_oracle: Oracle,
    tmp_path: Path,
) -> None:
    tar = builder.to_ggcr_tarball(
        edge_image.layout, edge_image.tag, tmp_path / "ggcr.tar", NAME, compression=compression
    )
    image = open_image(f"docker-archive:{tar}")
    assert all(layer.verify_diff_id for layer in image.layers)
    assert all(layer.descriptor.digest != layer.diff_id for layer in image.layers)
    log = tmp_path / "imagefs.log"
    with mounted(f"docker-archive:{tar}", tmp_path / "mnt", log=log) as mnt:
        actual = snapshot(mnt)
    differences = compare(edge_oracle.records, actual)
    assert differences == [], "\n".join(differences[:50])
    assert "ERROR" not in log.read_text()


def _small_layout(tmp_path: Path) -> Path:
    layers = [
        builder.make_layer_tar([directory("etc"), file("etc/a", "alpha\n")]),
        builder.make_layer_tar([file("etc/b", "beta\n")]),
    ]
    return builder.write_oci_layout(tmp_path / "layout", layers, compression="gzip", tag="t")


def _swap_top_layer(i: int, tar: bytes) -> bytes:
    # Another tar than the config's diff_id names, compressed and named
    # consistently: only the diff_id check over the decompressed stream sees it.
    return builder.make_layer_tar([file("etc/b", "EVIL\n")]) if i == 1 else tar


def test_a_diff_id_mismatch_over_the_decompressed_stream_is_refused(tmp_path: Path) -> None:
    tar = builder.to_ggcr_tarball(_small_layout(tmp_path), "t", tmp_path / "bad.tar", NAME,
                                  tamper=_swap_top_layer)  # fmt: skip
    image = open_image(str(tar))
    with pytest.raises(DigestMismatchError) as caught:
        load_image(image, cache_dir=None).close()
    message = str(caught.value)
    assert f"expected {image.layers[1].diff_id}" in message
    assert "over the uncompressed layer tar" in message and "diff_id" in message
    # The command line says the same, on one line, and nothing is mounted.
    (tmp_path / "mnt").mkdir()
    result = run_imagefs("mount", tar, tmp_path / "mnt", "--cache-dir", tmp_path / "cache")
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "digest mismatch" in lines[0] and "uncompressed" in lines[0]


def test_a_name_that_lies_about_the_compressed_bytes_is_refused(tmp_path: Path) -> None:
    good = builder.to_ggcr_tarball(_small_layout(tmp_path), "t", tmp_path / "good.tar", NAME)
    with tarfile.open(good) as archive:
        members = {m.name: archive.extractfile(m).read() for m in archive.getmembers()}  # type: ignore[union-attr]
    manifest = json.loads(members["manifest.json"])
    first = manifest[0]["Layers"][0]
    liar = "0" * 64 + ".tar.gz"
    members[liar] = members.pop(first)
    manifest[0]["Layers"][0] = liar
    members["manifest.json"] = json.dumps(manifest).encode()
    bad = tmp_path / "liar.tar"
    with tarfile.open(bad, "w") as archive:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    with pytest.raises(
        DigestMismatchError, match=f"expected sha256:{'0' * 64}, found .* over the blob"
    ):
        load_image(open_image(str(bad)), cache_dir=None).close()


def test_a_cached_index_or_tree_of_another_diff_id_is_not_served(tmp_path: Path) -> None:
    """The same compressed bytes under a config claiming another diff_id: refused, cache or not."""
    layout = _small_layout(tmp_path)
    cache = tmp_path / "cache"
    good = builder.to_ggcr_tarball(layout, "t", tmp_path / "good.tar", NAME)
    load_cached(open_image(str(good)), cache_dir=cache).close()  # index and tree cached
    # Same layer files, a config whose diff_id for the top layer is another.
    with tarfile.open(good) as archive:
        members = {m.name: archive.extractfile(m).read() for m in archive.getmembers()}  # type: ignore[union-attr]
    manifest = json.loads(members["manifest.json"])
    config = json.loads(members[manifest[0]["Config"]])
    config["rootfs"]["diff_ids"][1] = builder.sha256_digest(b"some other tar")
    config_bytes = json.dumps(config).encode()
    del members[manifest[0]["Config"]]
    manifest[0]["Config"] = builder.sha256_digest(config_bytes)
    members[manifest[0]["Config"]] = config_bytes
    members["manifest.json"] = json.dumps(manifest).encode()
    forged = tmp_path / "forged.tar"
    with tarfile.open(forged, "w") as archive:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    with pytest.raises(DigestMismatchError, match="over the uncompressed layer tar"):
        load_cached(open_image(str(forged)), cache_dir=cache).close()
