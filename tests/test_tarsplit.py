"""The tar-split parser and CRC-64, against records the real podman wrote, and hostile ones.

Valid records come from a podman store (tests.engines); malformed ones
are that record edited line by line, so each case differs from a real file
in exactly one way and must fail with a one-line TarSplitError (or
CompressionError) naming the file and the line, never a traceback.
"""

from __future__ import annotations

import base64
import gzip
import io
import json
import os
import tarfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from imagefs.errors import CompressionError, LayerError, TarSplitError
from imagefs.layers import tarsplit
from imagefs.layers.rebuilt import clean_member_name
from imagefs.layers.tarsplit import FileRecord, Segment, crc64, crc64_bytes, read_records
from tests.engines import Podman
from tests.images import BuiltImage, store_layers
from tests.producers import RegistryImages

pytestmark = pytest.mark.tools


@pytest.fixture(scope="module")
def podman_records(
    tmp_path_factory: pytest.TempPathFactory,
    registry_images: RegistryImages,
    store_image: BuiltImage,
) -> list[bytes]:
    """The gzip'd tar-split records podman wrote for the fixture image's layers."""
    with Podman(tmp_path_factory.mktemp("tarsplit-podman")) as podman:
        podman.pull(registry_images.ref(store_image))
        records = sorted((podman.root / "overlay-layers").glob("*.tar-split.gz"))
        assert len(records) == 3
        return [path.read_bytes() for path in records]


def _parse(data: bytes, tmp_path: Path) -> list[Segment | FileRecord]:
    path = tmp_path / "record.tar-split.gz"
    path.write_bytes(data)
    fd = os.open(path, os.O_RDONLY)
    try:
        return list(read_records(fd, str(path)))
    finally:
        os.close(fd)


def _lines(record: bytes) -> list[dict[str, Any]]:
    return [json.loads(line) for line in gzip.decompress(record).splitlines()]


def _pack(entries: list[dict[str, Any]]) -> bytes:
    return gzip.compress(b"".join(json.dumps(e).encode() + b"\n" for e in entries))


def _rebuild(records: list[Segment | FileRecord], files: dict[str, bytes]) -> bytes:
    out = bytearray()
    for record in records:
        if isinstance(record, Segment):
            out += record.payload
        elif record.size:
            out += files[os.fsdecode(record.name)]
    return bytes(out)


def test_crc64_is_gos_iso_table() -> None:
    # CRC-64/GO-ISO check value (reveng catalogue); hash/crc64 with crc64.ISO.
    assert crc64(b"123456789") == 0xB90956C775A41001
    assert crc64(b"56789", crc64(b"1234")) == 0xB90956C775A41001
    assert crc64_bytes(0xB90956C775A41001) == bytes.fromhex("b90956c775a41001")


def _file_contents(tar: bytes) -> dict[str, bytes]:
    """Each regular member's bytes, read by tarfile (an independent reader)."""
    with tarfile.open(fileobj=io.BytesIO(tar)) as archive:
        return {
            member.name: archive.extractfile(member).read()  # type: ignore[union-attr]
            for member in archive.getmembers()
            if member.isfile()
        }


def test_podman_records_rebuild_the_layers(podman_records: list[bytes], tmp_path: Path) -> None:
    """Segments plus file contents are the original tar; each CRC is its file's."""
    originals = store_layers()
    matched = []
    for record in podman_records:
        entries = _parse(record, tmp_path)
        names = {os.fsdecode(e.name) for e in entries if isinstance(e, FileRecord) and e.size}
        for index, tar in enumerate(originals):
            files = _file_contents(tar)
            if names <= files.keys() and _rebuild(entries, files) == tar:
                matched.append(index)
                for entry in entries:
                    if isinstance(entry, FileRecord) and entry.size:
                        assert entry.crc == crc64_bytes(crc64(files[os.fsdecode(entry.name)]))
    assert sorted(matched) == [0, 1, 2]


def _case(name: str, edit: Callable[[list[dict[str, Any]]], None], message: str) -> Any:
    return pytest.param(edit, message, id=name)


def _file_entry(entries: list[dict[str, Any]]) -> dict[str, Any]:
    return next(e for e in entries if e["type"] == 1 and e.get("size"))


def _set(key: str, value: Any) -> Callable[[list[dict[str, Any]]], None]:
    def edit(entries: list[dict[str, Any]]) -> None:
        _file_entry(entries)[key] = value

    return edit


def _duplicate(entries: list[dict[str, Any]]) -> None:
    first = _file_entry(entries)
    entries.append({**first, "name": "./" + first["name"], "position": len(entries)})


def _segment_payload(entries: list[dict[str, Any]]) -> None:
    entries[0]["payload"] = "not base64!"


def _unknown_type(entries: list[dict[str, Any]]) -> None:
    entries[0]["type"] = 3


def _positions(entries: list[dict[str, Any]]) -> None:
    entries[1]["position"] = 7


def _no_name(entries: list[dict[str, Any]]) -> None:
    del _file_entry(entries)["name"]


def _array(entries: list[dict[str, Any]]) -> None:
    entries[0] = [1, 2]  # type: ignore[call-overload]


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        _case("crc-length", _set("payload", base64.b64encode(b"1234").decode()), "8-byte CRC-64"),
        _case("crc-missing", _set("payload", None), "8-byte CRC-64"),
        _case("size-type", _set("size", "5"), "'size' must be an integer"),
        _case("size-bool", _set("size", True), "'size' must be an integer"),
        _case("size-negative", _set("size", -1), "out of range"),
        _case("name-type", _set("name", 5), "'name' must be a string"),
        _case("name-raw", _set("name_raw", "%%%"), "'name_raw' is not base64"),
        _case("no-name", _no_name, "without a name"),
        _case("duplicate", _duplicate, "a second entry for"),
        _case("segment-base64", _segment_payload, "'payload' is not base64"),
        _case("unknown-type", _unknown_type, "unknown entry type 3"),
        _case("position", _positions, "position 7, expected 1"),
        _case("not-an-object", _array, "must be a JSON object"),
    ],
)
def test_malformed_records(
    edit: Callable[[list[dict[str, Any]]], None],
    message: str,
    podman_records: list[bytes],
    tmp_path: Path,
) -> None:
    entries = _lines(podman_records[0])
    edit(entries)
    with pytest.raises(TarSplitError) as info:
        _parse(_pack(entries), tmp_path)
    text = str(info.value)
    assert message in text and "record.tar-split.gz: line " in text and "\n" not in text


def test_name_raw_wins_over_name(podman_records: list[bytes], tmp_path: Path) -> None:
    entries = _lines(podman_records[0])
    entry = _file_entry(entries)
    entry["name_raw"] = base64.b64encode(b"caf\xe9/latin1").decode()
    parsed = [e for e in _parse(_pack(entries), tmp_path) if isinstance(e, FileRecord)]
    assert b"caf\xe9/latin1" in [record.name for record in parsed]


@pytest.mark.parametrize(
    ("damage", "error", "message"),
    [
        (lambda data: data[: len(data) // 2], CompressionError, "truncated"),
        (lambda data: b"plain text, not gzip\n", CompressionError, "corrupt gzip"),
        (lambda data: data + b"trailing garbage", CompressionError, "corrupt gzip"),
        (lambda data: gzip.compress(b""), TarSplitError, "no records"),
        (lambda data: gzip.compress(b"{not json}\n"), TarSplitError, "not a JSON entry"),
    ],
)
def test_damaged_files(
    damage: Callable[[bytes], bytes],
    error: type[LayerError],
    message: str,
    podman_records: list[bytes],
    tmp_path: Path,
) -> None:
    with pytest.raises(error) as info:
        _parse(damage(podman_records[0]), tmp_path)
    assert message in str(info.value)


def test_concatenated_gzip_members(podman_records: list[bytes], tmp_path: Path) -> None:
    """gzip allows members back to back (as a writer that flushes per entry makes)."""
    text = gzip.decompress(podman_records[0])
    lines = text.splitlines(keepends=True)
    split = b"".join(gzip.compress(line) for line in lines)
    assert _parse(split, tmp_path) == _parse(podman_records[0], tmp_path)


def test_bounds(
    podman_records: list[bytes], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A hostile record hits a bound, not the memory: line length, entries, text size."""
    long_line = gzip.compress(b'{"type":2,"payload":"' + b"A" * (tarsplit.MAX_LINE + 4) + b'"}\n')
    with pytest.raises(TarSplitError, match="a line longer than"):
        _parse(long_line, tmp_path)
    monkeypatch.setattr(tarsplit, "MAX_ENTRIES", 3)
    with pytest.raises(TarSplitError, match="more than 3 entries"):
        _parse(podman_records[0], tmp_path)
    monkeypatch.setattr(tarsplit, "MAX_ENTRIES", 10**6)
    monkeypatch.setattr(tarsplit, "MAX_TEXT", 1000)
    with pytest.raises(TarSplitError, match="more than 1000 bytes of records"):
        _parse(podman_records[0], tmp_path)


def test_gzip_bomb_is_bounded_not_inflated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """64 MiB of newlines in a 64 KiB gzip: refused by MAX_TEXT while inflating."""
    monkeypatch.setattr(tarsplit, "MAX_TEXT", 8 << 20)
    bomb = gzip.compress(b"\n" * (64 << 20), compresslevel=9)
    assert len(bomb) < 1 << 20
    with pytest.raises(TarSplitError, match="bytes of records"):
        _parse(bomb, tmp_path)


@pytest.mark.parametrize(
    ("name", "clean"),
    [
        (b"etc/passwd", "etc/passwd"),
        (b"./etc//passwd", "etc/passwd"),
        (b"/abs/path", "abs/path"),
        (b"dir/", "dir"),
        (b"./", ""),
        (b"../escape", None),
        (b"a/../../b", None),
        (b"nul\0byte", None),
        (b"caf\xe9", os.fsdecode(b"caf\xe9")),
    ],
)
def test_clean_member_name(name: bytes, clean: str | None) -> None:
    assert clean_member_name(name) == clean


def test_iterator_is_lazy(podman_records: list[bytes], tmp_path: Path) -> None:
    """Entries stream out as lines decode: the first one needs no more than its line."""
    path = tmp_path / "record"
    path.write_bytes(podman_records[0])
    fd = os.open(path, os.O_RDONLY)
    try:
        records: Iterator[Segment | FileRecord] = read_records(fd, str(path))
        assert isinstance(next(records), Segment)
    finally:
        os.close(fd)
