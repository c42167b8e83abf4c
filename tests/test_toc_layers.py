"""eStargz and zstd:chunked layers from real producers, mounted through the kernel.

One image is built by umoci (the basic image's three layers, plus a layer of
big files: random data split into several chunks, compressible text, a file
with a hole of zeros, a hardlink to a big file), pushed to a test registry,
and converted by the tools that write these formats:

* ``ctr-remote image convert --estargz --oci`` and ``--zstdchunked --oci``
  (stargz-snapshotter 0.12, with 128 KiB chunks) in the session's
  containerd (tests.engines), pushed back to the registry and copied into
  OCI layouts by skopeo, and exported with ``ctr images export``;
* ``skopeo copy --dest-compress-format zstd:chunked`` (containers/storage).

Every variant is mounted and compared with ``umoci unpack`` of the same
image (tests.oracle, through a gzip copy where umoci cannot read it),
minus the eStargz bookkeeping files, which umoci shows and a mount must not.
The debug log proves how: every layer indexed from its TOC, nothing decoded
but the chunks a read touched. A chunk corrupted in a live mount gives EIO
for its file only; a TOC that does not match its annotated digest refuses
the mount; a registry mount (read the ordinary way) hides the same files.
"""

from __future__ import annotations

import errno
import json
import os
import random
import re
import shutil
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests import builder, images, oracle
from tests.engines import CtrRemote, Skopeo, TocKind
from tests.mounting import mounted, run_imagefs
from tests.needs import require_tools
from tests.oracle import toc_json, toc_json_bytes
from tests.producers import ctr_remote_push, skopeo_zstd_chunked
from tests.registry import Registry

pytestmark = [pytest.mark.tools, pytest.mark.fuse]

TAG = "toc"
CHUNK = 128 << 10  # ctr-remote --estargz-chunk-size
BIG_RANDOM = "big/random.bin"
BIG_RANDOM_SIZE = 600 << 10  # five 128 KiB chunks (the last one short)
BIG_TEXT = "big/text.txt"
HOLES = "big/holes.bin"
BIG_LINK = "big/z-random-hardlink.bin"  # after BIG_RANDOM: umoci stores the data with the first
BOOKKEEPING = ("stargz.index.json", ".no.prefetch.landmark", ".prefetch.landmark")
TOC_DIGEST = "containerd.io/snapshot/stargz/toc.digest"
ZSTD_CHECKSUM = "io.containers.zstd-chunked.manifest-checksum"
ESTARGZ_WRITTEN = ("estargz-oci", "estargz-oci-archive", "estargz-ctr-export", "zstdchunked-oci")


def big_files(root: Path) -> None:
    """Layer 4: files big enough to be split into chunks, a hole, a hardlink."""
    rng = random.Random(14)
    (root / "big").mkdir()
    (root / BIG_RANDOM).write_bytes(rng.randbytes(BIG_RANDOM_SIZE))
    os.link(root / BIG_RANDOM, root / BIG_LINK)
    text = "".join(
        f"line {i:06d}: the quick brown fox jumps over the lazy dog\n" for i in range(30000)
    )
    (root / BIG_TEXT).write_text(text)
    hole = bytes(256 << 10)
    (root / HOLES).write_bytes(rng.randbytes(100 << 10) + hole + rng.randbytes(100 << 10))
    (root / "big/empty").write_bytes(b"")


@dataclass
class Produced:
    """The converted variants of one image, and what checks them."""

    plain: Path
    registry: Registry
    workdir: Path
    refs: dict[str, str]  # registry references of the ctr-remote conversions
    sources: dict[str, str]  # variant -> imagefs SOURCE
    layouts: dict[str, Path]  # variant -> OCI layout with the same blobs
    _oracles: dict[str, oracle.Oracle] = field(default_factory=dict)

    def oracle(self, variant: str) -> oracle.Oracle:
        """``umoci unpack`` of the variant's own image (a gzip copy where needed)."""
        if variant not in self._oracles:
            bundle = self.workdir / f"umoci-{variant}" / "bundle"
            bundle.parent.mkdir()
            self._oracles[variant] = oracle.umoci_oracle(self.layouts[variant], TAG, bundle)
        return self._oracles[variant]

    def blobs(self, variant: str) -> list[bytes]:
        layout = self.layouts[variant]
        return [
            builder.blob_path(layout, layer["digest"]).read_bytes()
            for layer in layer_descriptors(layout, TAG)
        ]


@pytest.fixture(scope="module")
def produced(
    image_tools: None,
    tmp_path_factory: pytest.TempPathFactory,
    ctr_remote: CtrRemote,
    skopeo: Skopeo,
) -> Iterator[Produced]:
    require_tools("docker-registry", "umoci")
    work = tmp_path_factory.mktemp("toc")
    plain = work / "plain"
    steps = [images.basic_base, images.basic_changes, images.basic_replacements, big_files]
    builder.umoci_build(plain, TAG, steps)
    registry = Registry(work / "registry")
    try:
        plain_ref = registry.push(f"oci:{plain}:{TAG}", f"toc/image:{TAG}")
        ctr_remote.containerd.fetch(plain_ref)
        chunked = ("--estargz-chunk-size", str(CHUNK))
        repo = plain_ref.rsplit(":", 1)[0]
        conversions: list[tuple[TocKind, str]] = [("estargz", "esgz"), ("zstdchunked", "zstdc")]
        refs: dict[str, str] = {
            kind: ctr_remote_push(ctr_remote, plain_ref, kind, *chunked, dest=f"{repo}:{tag}")
            for kind, tag in conversions
        }
        layouts = {
            "estargz-oci": work / "estargz",
            "zstdchunked-oci": work / "zstdchunked",
            "skopeo-zstdchunked-oci": work / "skopeo-zstdchunked",
        }
        sources = {
            "estargz-oci": _to_layout(skopeo, refs["estargz"], layouts["estargz-oci"]),
            "zstdchunked-oci": _to_layout(skopeo, refs["zstdchunked"], layouts["zstdchunked-oci"]),
            "skopeo-zstdchunked-oci": skopeo_zstd_chunked(
                skopeo, plain, TAG, layouts["skopeo-zstdchunked-oci"]
            ),
        }
        for variant in ("estargz", "skopeo-zstdchunked"):
            archive = builder.to_oci_archive(
                layouts[f"{variant}-oci"], TAG, work / f"{variant}.oci-archive.tar"
            )
            sources[f"{variant}-oci-archive"] = f"oci-archive:{archive}:{TAG}"
            layouts[f"{variant}-oci-archive"] = layouts[f"{variant}-oci"]
        exported = ctr_remote.containerd.export(work / "estargz.ctr-export.tar", refs["estargz"])
        sources["estargz-ctr-export"] = str(exported)
        layouts["estargz-ctr-export"] = layouts["estargz-oci"]
    except BaseException:
        registry.stop()
        raise
    try:
        yield Produced(plain, registry, work, refs, sources, layouts)
    finally:
        registry.stop()


def _to_layout(skopeo: Skopeo, reference: str, layout: Path) -> str:
    """``skopeo copy docker://REF oci:LAYOUT:TAG`` (plain HTTP), manifest kept as is."""
    skopeo.copy(f"docker://{reference}", f"oci:{layout}:{TAG}", "--src-tls-verify=false")
    return f"oci:{layout}:{TAG}"


VARIANTS = (
    "estargz-oci",
    "estargz-oci-archive",
    "estargz-ctr-export",
    "zstdchunked-oci",
    "skopeo-zstdchunked-oci",
    "skopeo-zstdchunked-oci-archive",
)


def _log_lines(log: Path) -> list[str]:
    return log.read_text(errors="replace").splitlines()


def _without(records: dict[str, oracle.Record], names: tuple[str, ...]) -> dict[str, oracle.Record]:
    return {path: record for path, record in records.items() if path not in names}


# --------------------------------------------------------------------------- oracles

# Independent readers of what the tools wrote: the TOC JSON of a blob, read
# with Python's zlib/zstandard, tarfile and json, not with imagefs.


def layer_descriptors(layout: Path, tag: str) -> list[dict[str, Any]]:
    layers: list[dict[str, Any]] = builder.image_manifest(layout, tag)["layers"]
    return layers


# --------------------------------------------------------------------------- the tree


@pytest.mark.parametrize("variant", VARIANTS)
def test_mount_equals_umoci_unpack_and_reads_only_the_toc(
    produced: Produced, variant: str, tmp_path: Path
) -> None:
    expected = produced.oracle(variant).records
    if variant in ESTARGZ_WRITTEN:
        # umoci shows the eStargz library's own files, as any tar reader would.
        assert ".no.prefetch.landmark" in expected
        if variant.startswith("estargz"):
            assert "stargz.index.json" in expected
        expected = _without(expected, BOOKKEEPING)
    log = tmp_path / "imagefs.log"
    with mounted(produced.sources[variant], tmp_path / "mnt", "--debug", log=log) as mnt:
        actual = oracle.snapshot(mnt)
    assert oracle.compare(expected, actual) == []
    lines = _log_lines(log)
    fmt = "eStargz" if variant.startswith("estargz") else "zstd:chunked"
    indexed = [line for line in lines if f"from its {fmt} TOC" in line]
    assert len(indexed) == 4, "\n".join(lines)
    assert not [line for line in lines if " scanning" in line or "WARNING" in line]
    # snapshot() read every file of the tree once: each chunk decoded at most
    # once (the rest from the cache), and only chunks of the TOCs' files.
    decoded = [line.split(" DEBUG: ", 1)[1] for line in lines if "decoded a chunk" in line]
    assert len(decoded) == len(set(decoded))
    assert len(decoded) <= sum(_data_chunks(blob) for blob in produced.blobs(variant))
    assert len(decoded) >= _data_chunks(produced.blobs(variant)[3])  # the last layer is all visible


def _data_chunks(blob: bytes) -> int:
    """Chunks of the files a mount shows (not the TOC's own stargz.index.json), per the TOC."""
    entries = toc_json(blob)["entries"]
    count = 0
    for entry in entries:
        if entry["name"] in BOOKKEEPING:
            continue
        if entry["type"] == "chunk" or (entry["type"] == "reg" and entry.get("size", 0) > 0):
            count += 1
    return count


def test_chunks_are_what_the_writers_made(produced: Produced) -> None:
    """The fixture exercises what it claims: multi-chunk files in every format, a zeros chunk."""
    for variant in ("estargz-oci", "zstdchunked-oci", "skopeo-zstdchunked-oci"):
        entries = toc_json(produced.blobs(variant)[3])["entries"]
        chunks = [e for e in entries if e["type"] == "chunk" and e["name"] == BIG_RANDOM]
        assert len(chunks) >= 4, variant
    skopeo = toc_json(produced.blobs("skopeo-zstdchunked-oci")[3])["entries"]
    assert any(e.get("chunkType") == "zeros" for e in skopeo if e["name"] == HOLES)


# --------------------------------------------------------------------------- lazy reads


def _chunk_offsets(blob: bytes, name: str) -> list[tuple[int, int]]:
    """(chunk offset in the file, member offset in the blob) of each chunk of ``name``."""
    found = []
    for entry in toc_json(blob)["entries"]:
        if entry["name"] == name and entry["type"] in ("reg", "chunk"):
            found.append((entry.get("chunkOffset", 0), entry["offset"]))
    return found


@pytest.mark.parametrize("variant", ["estargz-oci", "skopeo-zstdchunked-oci"])
def test_a_read_decodes_only_the_chunk_it_touches(
    produced: Produced, variant: str, tmp_path: Path
) -> None:
    blob = produced.blobs(variant)[3]
    chunks = _chunk_offsets(blob, BIG_RANDOM)
    # A byte in the middle of the third chunk: only that chunk may be decoded.
    file_offset, member = chunks[2]
    following = chunks[3][0]
    at = (file_offset + following) // 2
    log = tmp_path / "imagefs.log"
    with mounted(produced.sources[variant], tmp_path / "mnt", "--debug", log=log) as mnt:
        fd = os.open(mnt / BIG_RANDOM, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)  # no readahead into the next chunk
            data = os.pread(fd, 16, at)
        finally:
            os.close(fd)
        plain = (produced.oracle(variant).rootfs / BIG_RANDOM).read_bytes()
        assert data == plain[at : at + 16]
        decoded = [line for line in _log_lines(log) if "decoded a chunk" in line]
        assert len(decoded) == 1, decoded
        assert decoded[0].endswith(f"at blob offset {member}")
        found = re.search(r"from (\d+) compressed", decoded[0])
        assert found is not None and int(found.group(1)) < len(blob) // 3
        assert (mnt / BIG_RANDOM).read_bytes() == plain
        decoded = [line for line in _log_lines(log) if "decoded a chunk" in line]
        assert len(decoded) == len(chunks)  # each chunk once: the third came from the cache


# --------------------------------------------------------------------------- corruption


def _copy_layout(produced: Produced, variant: str, dest: Path) -> Path:
    shutil.copytree(produced.layouts[variant], dest)
    return dest


@pytest.mark.parametrize("variant", ["estargz-oci", "zstdchunked-oci", "skopeo-zstdchunked-oci"])
def test_a_corrupt_chunk_is_eio_for_its_file_only(
    produced: Produced, variant: str, tmp_path: Path
) -> None:
    layout = _copy_layout(produced, variant, tmp_path / "layout")
    layer = layer_descriptors(layout, TAG)[3]
    path = builder.blob_path(layout, layer["digest"])
    chunks = _chunk_offsets(path.read_bytes(), BIG_RANDOM)
    member = chunks[1][1]
    log = tmp_path / "imagefs.log"
    with mounted(f"oci:{layout}:{TAG}", tmp_path / "mnt", log=log) as mnt:
        # The mount verified the blob; now it changes under the live mount.
        with open(path, "r+b") as blob:
            blob.seek(member + 40)
            byte = blob.read(1)
            blob.seek(member + 40)
            blob.write(bytes([byte[0] ^ 0x55]))
        fd = os.open(mnt / BIG_RANDOM, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
            with pytest.raises(OSError) as raised:
                os.pread(fd, 4096, chunks[1][0] + 4096)
        finally:
            os.close(fd)
        assert raised.value.errno == errno.EIO
        plain = produced.oracle(variant).rootfs
        assert (mnt / BIG_TEXT).read_bytes() == (plain / BIG_TEXT).read_bytes()
        assert (mnt / "etc/passwd").read_bytes() == (plain / "etc/passwd").read_bytes()
        # The first chunk is intact: reads before the corrupt one still work.
        fd = os.open(mnt / BIG_RANDOM, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)  # no readahead into chunk 1
            assert os.pread(fd, 4096, 0) == (plain / BIG_RANDOM).read_bytes()[:4096]
        finally:
            os.close(fd)
    # One line per failed FUSE read, naming the layer and the file. The kernel
    # tries a page whose read failed once more before it gives up, so the
    # one pread above is two requests (readahead is off: no others).
    errors = [line.split(" ERROR: ", 1)[1] for line in _log_lines(log) if " ERROR: " in line]
    assert 1 <= len(errors) <= 2 and len(set(errors)) == 1, errors
    assert layer["digest"] in errors[0] and repr(BIG_RANDOM) in errors[0], errors


def _rewrite_manifest(layout: Path, change: Any) -> None:
    """Change the tagged manifest with ``change(manifest)``; re-point the tag at it."""
    manifest = builder.image_manifest(layout, TAG)
    change(manifest)
    media_type = manifest.get("mediaType", "application/vnd.oci.image.manifest.v1+json")
    descriptor = builder.write_json_blob(layout, manifest, media_type)
    builder.set_tag(layout, descriptor, TAG)


@pytest.mark.parametrize(
    ("variant", "annotation"),
    [
        ("estargz-oci", TOC_DIGEST),
        ("zstdchunked-oci", TOC_DIGEST),
        ("skopeo-zstdchunked-oci", ZSTD_CHECKSUM),
    ],
)
def test_a_toc_that_does_not_match_its_digest_refuses_the_mount(
    produced: Produced, variant: str, annotation: str, tmp_path: Path
) -> None:
    layout = _copy_layout(produced, variant, tmp_path / "layout")
    cache = tmp_path / "cache"
    # Mounted once as it is, so the cache holds its tree and layer indexes:
    # they must not let the tampered manifest skip the check.
    with mounted(f"oci:{layout}:{TAG}", tmp_path / "first", cache=cache):
        pass
    wrong = "sha256:" + "0" * 64

    def change(manifest: dict[str, Any]) -> None:
        assert annotation in manifest["layers"][2]["annotations"]
        manifest["layers"][2]["annotations"][annotation] = wrong

    _rewrite_manifest(layout, change)
    (tmp_path / "mnt").mkdir()
    result = run_imagefs("mount", f"--cache-dir={cache}", f"oci:{layout}:{TAG}", tmp_path / "mnt")
    assert result.returncode == 1, result.stderr
    message = result.stderr.strip()
    assert len(message.splitlines()) == 1
    layer = layer_descriptors(layout, TAG)[2]["digest"]
    assert "digest mismatch" in message and layer in message and wrong in message, message


# --------------------------------------------------------------------------- bookkeeping


def test_layers_view_shows_the_bookkeeping_files(produced: Produced, tmp_path: Path) -> None:
    blobs = produced.blobs("estargz-oci")
    layout = produced.layouts["estargz-oci"]
    annotations = [layer["annotations"] for layer in layer_descriptors(layout, TAG)]
    with mounted(produced.sources["estargz-oci"], tmp_path / "mnt", "--layers") as mnt:
        for index, blob in enumerate(blobs):
            layer = mnt / "layers" / str(index)
            document = (layer / "stargz.index.json").read_bytes()
            assert document == toc_json_bytes(blob)
            assert builder.sha256_digest(document) == annotations[index][TOC_DIGEST]
            assert (layer / ".no.prefetch.landmark").read_bytes() == b"\x0f"
        names = set(os.listdir(mnt / "rootfs"))
        assert not names & set(BOOKKEEPING)
        for index in range(len(blobs)):
            assert not set(os.listdir(mnt / "upto" / str(index))) & set(BOOKKEEPING)


def test_a_plain_layer_keeps_files_with_bookkeeping_names(tmp_path: Path) -> None:
    members = [
        builder.file(".prefetch.landmark", b"\x0f"),
        builder.file("stargz.index.json", b"{}"),
        builder.file("etc/hostname", "plain\n"),
    ]
    layout = builder.write_oci_layout(
        tmp_path / "layout", [builder.make_layer_tar(members)], compression="gzip", tag="t"
    )
    with mounted(f"oci:{layout}:t", tmp_path / "mnt") as mnt:
        assert (mnt / ".prefetch.landmark").read_bytes() == b"\x0f"
        assert (mnt / "stargz.index.json").read_bytes() == b"{}"


@pytest.mark.parametrize("kind", ["estargz", "zstdchunked"])
def test_a_registry_mount_read_the_ordinary_way_hides_them_too(
    produced: Produced, kind: str, tmp_path: Path
) -> None:
    """A registry download (``--lazy never``) is scanned as it arrives, as a tar stream."""
    variant = "estargz-oci" if kind == "estargz" else "zstdchunked-oci"
    expected = _without(produced.oracle(variant).records, BOOKKEEPING)
    log = tmp_path / "imagefs.log"
    ref = f"docker://{produced.refs[kind]}"
    with mounted(ref, tmp_path / "mnt", "--debug", "--lazy=never", log=log) as mnt:
        actual = oracle.snapshot(mnt)
    assert oracle.compare(expected, actual) == []
    lines = _log_lines(log)
    assert not [line for line in lines if "WARNING" in line], lines
    if kind == "zstdchunked":
        # ctr-remote's zstd:chunked stream ends without end-of-archive blocks.
        assert [line for line in lines if "end-of-archive" in line and "DEBUG" in line]


def test_toc_json_is_what_the_annotation_names(produced: Produced) -> None:
    """The independent TOC reader of these tests agrees with ctr-remote's annotation."""
    layout = produced.layouts["estargz-oci"]
    blobs = produced.blobs("estargz-oci")
    for layer, blob in zip(layer_descriptors(layout, TAG), blobs, strict=True):
        assert builder.sha256_digest(toc_json_bytes(blob)) == layer["annotations"][TOC_DIGEST]
        assert json.loads(toc_json_bytes(blob))["version"] == 1
