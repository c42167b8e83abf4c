"""Real producers of eStargz and zstd:chunked layers, for tests (self-contained).

* :class:`Containerd`: a containerd started by the test with a private root,
  state directory and sockets under a temporary directory (CRI and the
  snapshotters it cannot use here disabled), stopped by its pid. It never
  touches the host's ``/var/lib/containerd`` or ``/run/containerd``.
* :func:`ctr_remote_convert`: ``ctr-remote image convert --estargz|--zstdchunked
  --oci`` (stargz-snapshotter 0.12) of an image fetched from a test registry,
  pushed back to it and copied into an OCI layout by skopeo, or exported with
  ``ctr export``.
* :func:`skopeo_zstd_chunked`: ``skopeo copy --dest-compress-format
  zstd:chunked`` (containers/storage's writer).

Plus independent readers of what they wrote, for oracles: the TOC JSON of a
blob, read with Python's gzip/zstandard and json, not with imagefs.
"""

from __future__ import annotations

import io
import json
import os
import signal
import struct
import subprocess
import tarfile
import time
import zlib
from pathlib import Path
from typing import Any

import zstandard

from tests import builder
from tests.needs import require_tools
from tests.registry import Registry

READY_TRIES = 400  # x 25 ms

_CONFIG = """\
version = 2
root = "{root}"
state = "{state}"
disabled_plugins = [
  "io.containerd.grpc.v1.cri",
  "io.containerd.snapshotter.v1.aufs",
  "io.containerd.snapshotter.v1.btrfs",
  "io.containerd.snapshotter.v1.devmapper",
  "io.containerd.snapshotter.v1.zfs",
  "io.containerd.tracing.processor.v1.otlp",
  "io.containerd.internal.v1.tracing",
]
[grpc]
  address = "{socket}"
[ttrpc]
  address = "{socket}.ttrpc"
[debug]
  address = "{debug}"
[metrics]
  address = ""
[plugins."io.containerd.internal.v1.opt"]
  path = "{opt}"
"""


class Containerd:
    """A private containerd daemon (root, state, sockets under ``directory``)."""

    def __init__(self, directory: Path) -> None:
        require_tools("containerd", "ctr-remote")
        directory.mkdir(parents=True, exist_ok=True)
        self.directory = directory
        self.socket = directory / "containerd.sock"
        config = directory / "config.toml"
        config.write_text(
            _CONFIG.format(
                root=directory / "root",
                state=directory / "state",
                socket=self.socket,
                debug=directory / "debug.sock",
                opt=directory / "opt",
            )
        )
        self._log = (directory / "containerd.log").open("wb")
        self.process = subprocess.Popen(
            ["containerd", "--config", str(config)], stdout=self._log, stderr=subprocess.STDOUT
        )
        self._wait_ready()

    def _wait_ready(self) -> None:
        for _ in range(READY_TRIES):
            if self.process.poll() is not None:
                break
            if self.socket.exists():
                probe = subprocess.run(
                    ["ctr-remote", "--address", str(self.socket), "version"],
                    capture_output=True,
                    check=False,
                )
                if probe.returncode == 0:
                    return
            time.sleep(0.025)
        self.stop()
        log = (self.directory / "containerd.log").read_text(errors="replace")
        raise RuntimeError(f"containerd did not start: {log[-2000:]}")

    def ctr(self, *args: str | Path) -> str:
        """Run ``ctr-remote --address SOCKET ARGS``; its stdout (fails loudly)."""
        command = ["ctr-remote", "--address", str(self.socket), *map(str, args)]
        result = subprocess.run(command, capture_output=True, text=True, check=False)
        if result.returncode != 0:
            raise RuntimeError(f"{' '.join(command)} failed: {result.stderr.strip()}")
        return result.stdout

    def stop(self) -> None:
        """Stop the daemon by its pid (SIGTERM, then SIGKILL)."""
        if self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.kill(self.process.pid, signal.SIGKILL)
                self.process.wait()
        self._log.close()


def ctr_remote_convert(
    containerd: Containerd,
    registry: Registry,
    source_ref: str,
    kind: str,
    dest_tag: str,
    *extra: str,
) -> str:
    """Convert ``source_ref`` (in ``registry``) with ctr-remote; push it; its reference.

    ``kind`` is ``"estargz"`` or ``"zstdchunked"``; ``extra`` goes to
    ``convert`` (``--estargz-chunk-size N``).
    """
    containerd.ctr("content", "fetch", "--plain-http", source_ref)
    repo = source_ref.rsplit(":", 1)[0]
    dest = f"{repo}:{dest_tag}"
    containerd.ctr("images", "convert", f"--{kind}", "--oci", *extra, source_ref, dest)
    containerd.ctr("images", "push", "--plain-http", dest)
    return dest


def ctr_export(containerd: Containerd, ref: str, dest_tar: Path) -> Path:
    """``ctr export``: an OCI archive of the image as containerd stores it."""
    containerd.ctr("images", "export", dest_tar, ref)
    return dest_tar


def registry_to_layout(reference: str, layout: Path, tag: str) -> str:
    """``skopeo copy docker://REF oci:LAYOUT:TAG`` (plain HTTP), manifest kept as is."""
    builder.skopeo_copy(f"docker://{reference}", f"oci:{layout}:{tag}", "--src-tls-verify=false")
    return f"oci:{layout}:{tag}"


def skopeo_zstd_chunked(layout: Path, tag: str, dest: Path) -> str:
    """``layout:tag`` copied to ``dest:tag`` with zstd:chunked layers (containers/storage)."""
    builder.skopeo_copy(
        f"oci:{layout}:{tag}",
        f"oci:{dest}:{tag}",
        "--dest-compress",
        "--dest-compress-format",
        "zstd:chunked",
    )
    return f"oci:{dest}:{tag}"


# --------------------------------------------------------------------------- oracles


def layer_descriptors(layout: Path, tag: str) -> list[dict[str, Any]]:
    layers: list[dict[str, Any]] = builder.image_manifest(layout, tag)["layers"]
    return layers


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
