"""Lazy registry mounts of eStargz and zstd:chunked images, proved by what crosses the wire.

One umoci-built image (the basic image's three layers and a layer of big
files) is pushed to a test registry and converted there by the real writers:
``ctr-remote image convert --estargz --oci`` and ``--zstdchunked --oci`` in a
containerd the test starts (private root, state and sockets; 128 KiB chunks),
once more with ``--estargz-record-in`` (prioritised files, a
``.prefetch.landmark``), and ``skopeo copy --dest-compress-format
zstd:chunked``. Every mount goes through :class:`tests.lazyproxy.LazyProxy`,
which records each request and its bytes, and corrupts, stalls or drops
answers on demand. Trees are compared with ``umoci unpack`` of the same
converted image (minus the eStargz bookkeeping files).
"""

from __future__ import annotations

import errno
import json
import os
import random
import struct
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from imagefs.cli import parse_mount_options
from imagefs.layers.toc.locate import TAIL_SIZE
from imagefs.registry.config import LazyMode, PrefetchMode
from tests import builder, images, oracle
from tests.engines import Containerd, Skopeo
from tests.lazyproxy import LazyProxy, Seen
from tests.mounting import mounted, run_imagefs
from tests.needs import require_tools
from tests.oracle import toc_json
from tests.producers import ctr_remote_convert, registry_to_layout, skopeo_zstd_chunked
from tests.registry import Registry

pytestmark = [pytest.mark.tools, pytest.mark.fuse]

TAG = "lazy"
CHUNK = 128 << 10
BIG_RANDOM = "big/random.bin"
BIG_RANDOM_SIZE = 600 << 10  # five chunks
BIG_TEXT = "big/text.txt"
OTHER_RANDOM = "big/other.bin"
SMALL = "etc/passwd"
PRIORITISED = "big/prioritised.bin"
BOOKKEEPING = ("stargz.index.json", ".no.prefetch.landmark", ".prefetch.landmark")
TOC_DIGEST = "containerd.io/snapshot/stargz/toc.digest"
SLACK = 64 << 10  # what one file may cost beyond its chunks (the target's 64 KiB)


def big_files(root: Path) -> None:
    rng = random.Random(1414)
    (root / "big").mkdir()
    (root / BIG_RANDOM).write_bytes(rng.randbytes(BIG_RANDOM_SIZE))
    (root / OTHER_RANDOM).write_bytes(rng.randbytes(300 << 10))
    (root / PRIORITISED).write_bytes(rng.randbytes(200 << 10))
    text = "".join(f"line {i:06d}: lazily pulled, verified chunk by chunk\n" for i in range(20000))
    (root / BIG_TEXT).write_text(text)


@dataclass
class Lazy:
    registry: Registry
    workdir: Path
    refs: dict[str, str]  # variant -> reference in the registry (without its host)
    layouts: dict[str, Path]
    _oracles: dict[str, oracle.Oracle] = field(default_factory=dict)

    def oracle(self, variant: str) -> oracle.Oracle:
        if variant not in self._oracles:
            bundle = self.workdir / f"umoci-{variant}" / "bundle"
            bundle.parent.mkdir()
            self._oracles[variant] = oracle.umoci_oracle(self.layouts[variant], TAG, bundle)
        return self._oracles[variant]

    def layers(self, variant: str) -> list[dict[str, Any]]:
        layers: list[dict[str, Any]] = builder.image_manifest(self.layouts[variant], TAG)["layers"]
        return layers

    def blob(self, variant: str, index: int) -> bytes:
        digest = self.layers(variant)[index]["digest"]
        return builder.blob_path(self.layouts[variant], digest).read_bytes()

    def ref(self, variant: str, proxy: LazyProxy) -> str:
        return f"{proxy.host}/{self.refs[variant]}"


@pytest.fixture(scope="module")
def lazy(image_tools: None, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lazy]:
    require_tools("docker-registry", "containerd", "ctr-remote", "skopeo", "umoci")
    work = tmp_path_factory.mktemp("lazy")
    plain = work / "plain"
    steps = [images.basic_base, images.basic_changes, images.basic_replacements, big_files]
    builder.umoci_build(plain, TAG, steps)
    registry = Registry(work / "registry")
    containerd = Containerd(work / "containerd").start()
    skopeo = Skopeo(work / "skopeo")
    try:
        plain_ref = registry.push(f"oci:{plain}:{TAG}", f"lazy/image:{TAG}")
        chunked = ("--estargz-chunk-size", str(CHUNK))
        record = work / "record.json"
        record.write_text(json.dumps({"path": PRIORITISED}) + "\n")
        full = {
            "estargz": ctr_remote_convert(containerd, plain_ref, "estargz", "esgz",
                                          *chunked),
            "zstdchunked": ctr_remote_convert(containerd, plain_ref, "zstdchunked",
                                              "zstdc", *chunked),
            "estargz-landmark": ctr_remote_convert(containerd, plain_ref, "estargz",
                                                   "esgz-landmark", *chunked,
                                                   "--estargz-record-in", str(record)),
        }  # fmt: skip
        # Written into a layout first: pushed with the flags, skopeo would
        # reuse the gzip blobs the registry already has for these layers.
        skopeo_zstd_chunked(skopeo, plain, TAG, work / "skopeo-zstdc")
        skopeo_ref = registry.push(f"oci:{work / 'skopeo-zstdc'}:{TAG}", "lazy/image:skopeo-zstdc")
        full["skopeo-zstdchunked"] = skopeo_ref
        layouts = {}
        for variant, ref in full.items():
            layouts[variant] = work / f"layout-{variant}"
            registry_to_layout(skopeo, ref, layouts[variant], TAG)
        refs = {variant: ref.split("/", 1)[1] for variant, ref in full.items()}
    except BaseException:
        registry.stop()
        raise
    finally:
        containerd.stop()
    try:
        yield Lazy(registry, work, refs, layouts)
    finally:
        registry.stop()


@pytest.fixture
def proxy(lazy: Lazy) -> Iterator[LazyProxy]:
    running = LazyProxy(lazy.registry.port)
    try:
        yield running
    finally:
        running.stop()


VARIANTS = ("estargz", "zstdchunked", "skopeo-zstdchunked")


def _expected(lazy: Lazy, variant: str) -> dict[str, oracle.Record]:
    records = lazy.oracle(variant).records
    return {path: record for path, record in records.items() if path not in BOOKKEEPING}


def _toc_range(blob: bytes) -> tuple[int, int]:
    """Where the TOC is (first byte, last byte), read from the footer without imagefs."""
    if blob.startswith(b"\x1f\x8b"):
        return int(blob[-51:][16:32], 16), len(blob) - 51 - 1
    short = struct.unpack_from("<II", blob, len(blob) - 48)
    payload = blob[-40:] if short[0] >> 4 == 0x184D2A5 and short[1] == 40 else blob[-64:]
    offset, length, _ = struct.unpack_from("<QQQ", payload)
    return offset - 8, offset + length - 1  # with the skippable frame's 8-byte header


def _ranges(seen: list[Seen], digest: str) -> list[str | None]:
    return [request.range for request in seen if request.blob == digest]


def _log(path: Path) -> list[str]:
    return path.read_text(errors="replace").splitlines()


def _chunk_members(blob: bytes, name: str) -> list[tuple[int, int]]:
    """(chunk offset in the file, member offset in the blob) of each chunk of ``name``."""
    return [
        (entry.get("chunkOffset", 0), entry["offset"])
        for entry in toc_json(blob)["entries"]
        if entry["name"] == name and entry["type"] in ("reg", "chunk")
    ]


def _walk(root: Path) -> int:
    count = 0
    for directory, dirs, files in os.walk(root):
        for name in dirs + files:
            os.lstat(os.path.join(directory, name))
            count += 1
    return count


# --------------------------------------------------------------------------- going live


@pytest.mark.parametrize("variant", VARIANTS)
def test_mount_fetches_only_manifest_config_footers_and_tocs(
    lazy: Lazy, proxy: LazyProxy, variant: str, tmp_path: Path
) -> None:
    layers = lazy.layers(variant)
    log = tmp_path / "imagefs.log"
    with mounted(lazy.ref(variant, proxy), tmp_path / "mnt", "--prefetch=none", "--debug",
                 log=log) as mnt:  # fmt: skip
        at_live = proxy.reset()
        assert _walk(mnt) > 20
        assert proxy.reset() == [], "find fetched something"
        # Every layer: its footer, then its TOC, both by range; nothing else.
        for index, layer in enumerate(layers):
            blob = lazy.blob(variant, index)
            size = len(blob)
            first, last = _toc_range(blob)
            assert _ranges(at_live, layer["digest"]) == [
                f"bytes={size - TAIL_SIZE}-{size - 1}",
                f"bytes={first}-{last}",
            ], (index, at_live)
        blob_bytes = sum(seen.body_bytes for seen in at_live if seen.blob)
        config = builder.image_manifest(lazy.layouts[variant], TAG)["config"]
        toc_bytes = blob_bytes - config["size"]
        assert toc_bytes == sum(
            TAIL_SIZE + _toc_range(lazy.blob(variant, i))[1] - _toc_range(lazy.blob(variant, i))[0]
            + 1 for i in range(len(layers))
        )  # fmt: skip
        assert all(seen.blob is None or seen.range or seen.blob == config["digest"]
                   for seen in at_live)  # fmt: skip
        # The tree equals umoci unpack of the same image; reading it all
        # fetched each chunk once (nothing asked for twice).
        actual = oracle.snapshot(mnt)
        assert oracle.compare(_expected(lazy, variant), actual) == []
        reads = proxy.reset()
        assert len({seen.range for seen in reads}) == len(reads)
        blobs_size = sum(len(lazy.blob(variant, i)) for i in range(len(layers)))
        assert sum(seen.body_bytes for seen in reads) <= blobs_size
    lines = _log(log)
    assert not [line for line in lines if "WARNING" in line or "ERROR" in line], lines
    assert len([line for line in lines if "fetched by range" in line]) == len(layers)


def test_one_file_costs_its_chunks_and_later_mounts_cost_nothing(
    lazy: Lazy, proxy: LazyProxy, tmp_path: Path
) -> None:
    variant = "estargz"
    cache = tmp_path / "cache"
    plain = lazy.oracle(variant).rootfs
    digest = lazy.layers(variant)[3]["digest"]
    with mounted(lazy.ref(variant, proxy), tmp_path / "mnt", "--prefetch=none",
                 cache=cache) as mnt:  # fmt: skip
        proxy.reset()
        assert (mnt / BIG_RANDOM).read_bytes() == (plain / BIG_RANDOM).read_bytes()
        seen = proxy.reset()
        assert {request.blob for request in seen} == {digest}
        # Random data does not compress: its chunks are its size, plus a few bytes each.
        assert sum(request.body_bytes for request in seen) <= BIG_RANDOM_SIZE + SLACK
        assert (mnt / SMALL).read_bytes() == (plain / SMALL).read_bytes()
        small = proxy.reset()
        assert 1 <= len(small) <= 2
        assert (
            sum(request.body_bytes for request in small) <= os.path.getsize(plain / SMALL) + SLACK
        )
        # Again: from the kernel's page cache or ours, nothing from the registry.
        fd = os.open(mnt / BIG_RANDOM, os.O_RDONLY)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        os.close(fd)
        assert (mnt / BIG_RANDOM).read_bytes() == (plain / BIG_RANDOM).read_bytes()
        assert proxy.reset() == []
    # A later mount, online: one HEAD for the tag and nothing else.
    with mounted(lazy.ref(variant, proxy), tmp_path / "mnt", "--prefetch=none",
                 cache=cache) as mnt:  # fmt: skip
        assert (mnt / BIG_RANDOM).read_bytes() == (plain / BIG_RANDOM).read_bytes()
        assert [(seen.method, seen.blob) for seen in proxy.reset()] == [("HEAD", None)]
    # Offline, with the registry gone: what was read is still there.
    proxy.down = True
    with mounted(lazy.ref(variant, proxy), tmp_path / "mnt", "--offline",
                 cache=cache) as mnt:  # fmt: skip
        assert (mnt / BIG_RANDOM).read_bytes() == (plain / BIG_RANDOM).read_bytes()
        assert (mnt / SMALL).read_bytes() == (plain / SMALL).read_bytes()
        with pytest.raises(OSError) as raised:
            (mnt / OTHER_RANDOM).read_bytes()  # never fetched
        assert raised.value.errno == errno.EIO
    assert proxy.seen == []


# --------------------------------------------------------------------------- failures


@pytest.mark.parametrize("variant", ["estargz", "skopeo-zstdchunked"])
def test_a_corrupt_chunk_is_eio_and_never_cached(
    lazy: Lazy, proxy: LazyProxy, variant: str, tmp_path: Path
) -> None:
    digest = lazy.layers(variant)[3]["digest"]
    chunks = _chunk_members(lazy.blob(variant, 3), BIG_RANDOM)
    file_offset, member = chunks[1]
    proxy.corrupt = (digest, member + 40)
    plain = (lazy.oracle(variant).rootfs / BIG_RANDOM).read_bytes()
    log = tmp_path / "imagefs.log"
    cache = tmp_path / "cache"
    with mounted(lazy.ref(variant, proxy), tmp_path / "mnt", "--prefetch=none", log=log,
                 cache=cache) as mnt:  # fmt: skip
        fd = os.open(mnt / BIG_RANDOM, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
            with pytest.raises(OSError) as raised:
                os.pread(fd, 4096, file_offset + 4096)
            assert raised.value.errno == errno.EIO
            assert (mnt / SMALL).read_bytes() == (lazy.oracle(variant).rootfs / SMALL).read_bytes()
            chunk_dirs = list((cache / "chunks").iterdir())
            stored = {int(p.name) for d in chunk_dirs for p in d.iterdir() if p.name.isdigit()}
            assert member not in stored
            # The registry answers right again: the same read now works.
            proxy.corrupt = None
            assert os.pread(fd, 4096, file_offset + 4096) == plain[file_offset + 4096 :][:4096]
        finally:
            os.close(fd)
    errors = [line.split(" ERROR: ", 1)[1] for line in _log(log) if " ERROR: " in line]
    assert 1 <= len(errors) <= 2 and len(set(errors)) == 1, errors
    assert digest in errors[0] and repr(BIG_RANDOM) in errors[0], errors


def test_a_registry_gone_or_stalled_leaves_the_mount_up(
    lazy: Lazy, proxy: LazyProxy, tmp_path: Path
) -> None:
    variant = "zstdchunked"
    plain = lazy.oracle(variant).rootfs
    log = tmp_path / "imagefs.log"
    with mounted(lazy.ref(variant, proxy), tmp_path / "mnt", "--prefetch=none",
                 log=log) as mnt:  # fmt: skip
        assert (mnt / SMALL).read_bytes() == (plain / SMALL).read_bytes()
        proxy.down = True
        with pytest.raises(OSError) as raised:
            (mnt / BIG_TEXT).read_bytes()
        assert raised.value.errno == errno.EIO
        assert sorted(os.listdir(mnt / "big")) == sorted(os.listdir(plain / "big"))
        errors = [line for line in _log(log) if " ERROR: " in line]
        assert errors and "registry" in errors[-1] and "cannot connect" in errors[-1], errors
        proxy.down = False
        assert (mnt / BIG_TEXT).read_bytes() == (plain / BIG_TEXT).read_bytes()
        # Stalled: a read waits, everything else goes on, and it ends when the link does.
        proxy.stall()
        result: dict[str, bytes] = {}
        reader = threading.Thread(
            target=lambda: result.setdefault("data", (mnt / BIG_RANDOM).read_bytes())
        )
        reader.start()
        try:
            for _ in range(2000):
                if proxy.stalled:
                    break
                reader.join(0.01)
            assert proxy.stalled, "the read never reached the registry"
            assert _walk(mnt) > 20
            assert (mnt / SMALL).read_bytes() == (plain / SMALL).read_bytes()
            assert "data" not in result
        finally:
            proxy.release()
            reader.join()
        assert result["data"] == (plain / BIG_RANDOM).read_bytes()


def _tampered(lazy: Lazy, variant: str, tmp_path: Path) -> str:
    """The variant pushed again with a wrong TOC digest annotation on its third layer."""
    layout = tmp_path / "tampered"
    builder.skopeo_copy(f"oci:{lazy.layouts[variant]}:{TAG}", f"oci:{layout}:{TAG}")
    manifest = builder.image_manifest(layout, TAG)
    annotations = manifest["layers"][2]["annotations"]
    key = (
        TOC_DIGEST
        if TOC_DIGEST in annotations
        else next(k for k in annotations if k.endswith("zstd-chunked.manifest-checksum"))
    )
    annotations[key] = "sha256:" + "0" * 64
    media_type = manifest.get("mediaType", "application/vnd.oci.image.manifest.v1+json")
    builder.set_tag(layout, builder.write_json_blob(layout, manifest, media_type), TAG)
    return lazy.registry.push(f"oci:{layout}:{TAG}", f"lazy/tampered:{variant}").split("/", 1)[1]


@pytest.mark.parametrize("variant", ["estargz", "skopeo-zstdchunked"])
def test_a_toc_that_does_not_match_its_digest_refuses_the_mount(
    lazy: Lazy, proxy: LazyProxy, variant: str, tmp_path: Path
) -> None:
    cache = tmp_path / "cache"
    # The good image first, so the cache holds the TOC, its chunk table and a tree.
    with mounted(lazy.ref(variant, proxy), tmp_path / "good", "--prefetch=none", cache=cache):
        pass
    ref = f"{proxy.host}/{_tampered(lazy, variant, tmp_path)}"
    (tmp_path / "mnt").mkdir()
    result = run_imagefs("mount", f"--cache-dir={cache}", ref, tmp_path / "mnt")
    assert result.returncode == 1, result.stderr
    message = result.stderr.strip()
    assert len(message.splitlines()) == 1, message
    layer = lazy.layers(variant)[2]["digest"]
    assert "digest mismatch" in message and layer in message, message


# --------------------------------------------------------------------------- background work


def _mount_state(mnt: Path) -> dict[str, Any]:
    result = run_imagefs("mounts", "--json", check=True)
    target = os.path.realpath(mnt)
    found: dict[str, Any] = next(m for m in json.loads(result.stdout) if m["mountpoint"] == target)
    return found


def test_landmark_prefetch_fetches_the_prioritised_files(
    lazy: Lazy, proxy: LazyProxy, tmp_path: Path
) -> None:
    variant = "estargz-landmark"
    names = [entry["name"] for entry in toc_json(lazy.blob(variant, 3))["entries"]]
    assert ".prefetch.landmark" in names
    assert names.index(PRIORITISED) < names.index(".prefetch.landmark")
    log = tmp_path / "imagefs.log"
    plain = lazy.oracle(variant).rootfs
    with mounted(lazy.ref(variant, proxy), tmp_path / "mnt", log=log) as mnt:
        for _ in range(3000):
            if any("prioritised chunks" in line for line in _log(log)):
                break
            threading.Event().wait(0.01)
        proxy.reset()
        assert (mnt / PRIORITISED).read_bytes() == (plain / PRIORITISED).read_bytes()
        assert proxy.reset() == []
        assert (mnt / OTHER_RANDOM).read_bytes() == (plain / OTHER_RANDOM).read_bytes()
        assert proxy.reset() != []  # not prioritised: fetched when read
        state = _mount_state(mnt)
        assert [layer["digest"] for layer in state["lazy_layers"]] == [
            layer["digest"] for layer in lazy.layers(variant)
        ]
        assert 0 < state["lazy_layers"][3]["local_bytes"] < state["lazy_layers"][3]["size"]
    assert not [line for line in _log(log) if "WARNING" in line or "ERROR" in line]


def test_prefetch_all_makes_the_image_local_and_verified(
    lazy: Lazy, proxy: LazyProxy, tmp_path: Path
) -> None:
    variant = "zstdchunked"
    cache = tmp_path / "cache"
    log = tmp_path / "imagefs.log"
    layers = lazy.layers(variant)
    with mounted(lazy.ref(variant, proxy), tmp_path / "mnt", "-o", "prefetch=all", log=log,
                 cache=cache) as mnt:  # fmt: skip
        for _ in range(6000):
            state = _mount_state(mnt)
            if all(layer["local_bytes"] == layer["size"] for layer in state["lazy_layers"]):
                break
            threading.Event().wait(0.01)
        assert all(layer["local_bytes"] == layer["size"] for layer in state["lazy_layers"])
        verified = [line for line in _log(log) if "blob digest verified" in line]
        assert len(verified) == len(layers), verified
        for layer in layers:
            blob = (cache / "blobs" / "sha256" / layer["digest"].split(":")[1]).read_bytes()
            assert builder.sha256_digest(blob) == layer["digest"]
        proxy.reset()
        actual = oracle.snapshot(mnt)
        assert proxy.reset() == []  # every read from the local blobs
    assert oracle.compare(_expected(lazy, variant), actual) == []
    proxy.down = True
    with mounted(lazy.ref(variant, proxy), tmp_path / "mnt", "--offline", cache=cache) as mnt:
        assert oracle.compare(_expected(lazy, variant), oracle.snapshot(mnt)) == []
        assert _mount_state(mnt)["lazy_layers"] == []  # local now: nothing lazy


def test_lazy_never_downloads_every_layer(lazy: Lazy, proxy: LazyProxy, tmp_path: Path) -> None:
    variant = "estargz"
    with mounted(lazy.ref(variant, proxy), tmp_path / "mnt", "--lazy=never") as mnt:
        seen = proxy.reset()
        assert oracle.compare(_expected(lazy, variant), oracle.snapshot(mnt)) == []
        assert _mount_state(mnt)["lazy_layers"] == []
    layers = [layer["digest"] for layer in lazy.layers(variant)]
    fetched = [s.blob for s in seen if s.blob is not None and s.blob in layers and s.range is None]
    assert sorted(fetched) == sorted(layers)
    assert not [s for s in seen if s.range is not None]


def test_lazy_options_as_mount_options() -> None:
    parsed = parse_mount_options("lazy=never,prefetch=all")
    assert parsed.settings == {"lazy": LazyMode.NEVER, "prefetch": PrefetchMode.ALL}
    with pytest.raises(Exception, match="not one of auto, never"):
        parse_mount_options("lazy=sometimes")


@pytest.mark.parametrize(("variant", "toc"), [("estargz", "eStargz"),
                                              ("skopeo-zstdchunked", "zstd:chunked")])  # fmt: skip
def test_inspect_says_which_layers_a_mount_reads_lazily(
    lazy: Lazy, proxy: LazyProxy, variant: str, toc: str, tmp_path: Path
) -> None:
    result = run_imagefs("inspect", "--json", f"--cache-dir={tmp_path / 'cache'}",
                         lazy.ref(variant, proxy))  # fmt: skip
    assert result.returncode == 0, result.stderr
    layers = json.loads(result.stdout)["layers"]
    assert [(layer["toc"], layer["lazy"]) for layer in layers] == [(toc, True)] * len(layers)
    text = run_imagefs("inspect", f"--cache-dir={tmp_path / 'cache'}", lazy.ref(variant, proxy))
    assert f"{toc} TOC (a registry mount reads it lazily)" in text.stdout, text.stdout
