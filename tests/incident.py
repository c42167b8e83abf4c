"""A suspect image for the incident-response tests, and raw views of its layers.

``incident`` has four layers, crafted entry by entry, in the three
compressions, and a history with steps that made no layer:

0. base (plain tar): ``/etc``, ``/app/config.yml``, ``/secrets`` (two
   keys), ``/bin/tool`` with a hardlink, ``/lib -> usr/lib``, a device,
   ``/var/log/app.log``, ``/cache``;
1. "build" (gzip): leaks ``/tmp/build.env``, overwrites the config with a
   password, backdoors ``/bin/tool`` (setuid), writes ``/app/notes.txt``
   twice (the first copy is shadowed inside the layer), and writes
   ``lib/evil.so`` through the ``lib`` symlink (it lands in ``/usr/lib``);
2. "cleanup" (zstd): whiteouts for ``/tmp/build.env``, ``/cache`` and
   ``/usr/lib/evil.so``, an opaque ``/secrets``, the config overwritten
   again, ``/var/log/app.log`` turned into a directory;
3. (gzip): ``/etc/spoof``, whose own xattrs take imagefs's provenance names.

Every string a later layer tries to hide contains ``SECRET``. The expected
places are spelled out here from the layer contents above, not computed by
imagefs's code.

The raw helpers read what the layer blobs hold with GNU ``tar -tvf`` and
Python's ``tarfile``, independently of imagefs.
"""

from __future__ import annotations

import hashlib
import io
import os
import subprocess
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests import builder
from tests.builder import Member, directory, file, hardlink, opaque, symlink, whiteout

INCIDENT_TAG = "incident"

CONFIG: dict[str, Any] = {
    "author": "incident fixture",
    "config": {
        "User": "app",
        "Env": ["PATH=/usr/bin:/bin", "APP_MODE=production"],
        "Entrypoint": ["/bin/tool"],
        "Cmd": ["--serve", "0.0.0.0:8080"],
        "WorkingDir": "/app",
        "ExposedPorts": {"8080/tcp": {}, "53/udp": {}},
        "Volumes": {"/data": {}},
        "Labels": {"org.opencontainers.image.title": "incident", "maintainer": "ops"},
        "StopSignal": "SIGTERM",
    },
}
HISTORY: list[dict[str, Any]] = [
    {"created": "2024-01-01T00:00:00Z", "created_by": "ADD rootfs.tar /"},
    {
        "created": "2024-01-01T00:00:01Z",
        "created_by": "ENV APP_MODE=production",
        "empty_layer": True,
    },
    {"created": "2024-01-01T00:00:02Z", "created_by": "RUN ./build.sh", "comment": "build"},
    {"created": "2024-01-01T00:00:03Z", "created_by": "USER app", "empty_layer": True},
    {"created": "2024-01-01T00:00:04Z", "created_by": "RUN rm -rf /tmp/build.env /secrets/*"},
    {"created": "2024-01-01T00:00:05Z", "created_by": "COPY spoof /etc/spoof"},
    {"created": "2024-01-01T00:00:06Z", "created_by": 'CMD ["--serve"]', "empty_layer": True},
]
LAYER_CREATED_BY = [
    "ADD rootfs.tar /",
    "RUN ./build.sh",
    "RUN rm -rf /tmp/build.env /secrets/*",
    "COPY spoof /etc/spoof",
]
SPOOFED = {"user.imagefs.layer": b"sha256:" + b"0" * 64, "user.note": b"spoof"}


def incident_layer0() -> list[Member]:
    return [
        directory("./"),
        directory("etc"),
        file("etc/passwd", "root:x:0:0:root:/root:/bin/sh\n"),
        file("etc/hosts", "127.0.0.1 localhost\n"),
        directory("app"),
        file("app/config.yml", "db_password: hunter2-old\n", mode=0o640),
        directory("secrets", mode=0o700),
        file("secrets/id_rsa", "-----BEGIN KEY----- SECRET-ID-RSA\n", mode=0o600),
        file("secrets/api.token", "SECRET-TOKEN-1\n", mode=0o600),
        directory("bin"),
        file("bin/tool", "tool v1\n", mode=0o755),
        hardlink("bin/tool-link", "bin/tool"),
        directory("usr"),
        directory("usr/lib"),
        symlink("lib", "usr/lib"),
        directory("dev"),
        Member("dev/null", "char", mode=0o666, devmajor=1, devminor=3),
        directory("var"),
        directory("var/log"),
        file("var/log/app.log", "started\n"),
        directory("cache"),
        file("cache/a", "cache a SECRET-CACHE-A\n"),
        file("cache/b", "cache b\n"),
    ]


def incident_layer1() -> list[Member]:
    return [
        directory("tmp", mode=0o1777),
        file("tmp/build.env", "AWS_SECRET_ACCESS_KEY=SECRET-AWS-KEY\n", mode=0o600),
        file("app/config.yml", "db_password: SECRET-DB-PASSWORD\n", mode=0o640),
        file("bin/tool", "tool v2 SECRET-BACKDOOR\n", mode=0o4755),
        file("etc/passwd", "root:x:0:0:root:/root:/bin/sh\napp:x:1000:1000::/app:/bin/sh\n"),
        file("app/notes.txt", "first copy SECRET-DUP-FIRST\n"),
        file("app/notes.txt", "second copy\n"),
        file("lib/evil.so", "ELF SECRET-VIA-SYMLINK\n", mode=0o755),
    ]


def incident_layer2() -> list[Member]:
    return [
        whiteout("tmp/build.env"),
        opaque("secrets"),
        file("secrets/README", "keys rotated\n"),
        whiteout("cache"),
        whiteout("usr/lib/evil.so"),
        file("app/config.yml", "db_password: ${DB_PASSWORD}\n", mode=0o640),
        directory("var/log/app.log"),
        file("var/log/app.log/current", "now a directory\n"),
    ]


def incident_layer3() -> list[Member]:
    return [file("etc/spoof", "claims another layer\n", xattrs=SPOOFED)]


INCIDENT_LAYERS = [incident_layer0, incident_layer1, incident_layer2, incident_layer3]

# What each place must hold (path -> content), from the layers above.
EXPECTED_DELETED = {
    2: {
        "tmp/build.env": b"AWS_SECRET_ACCESS_KEY=SECRET-AWS-KEY\n",
        "secrets/id_rsa": b"-----BEGIN KEY----- SECRET-ID-RSA\n",
        "secrets/api.token": b"SECRET-TOKEN-1\n",
        "cache/a": b"cache a SECRET-CACHE-A\n",
        "cache/b": b"cache b\n",
        "usr/lib/evil.so": b"ELF SECRET-VIA-SYMLINK\n",
    },
}
EXPECTED_SHADOWED = {
    1: {
        "app/config.yml": b"db_password: hunter2-old\n",
        "bin/tool": b"tool v1\n",
        "etc/passwd": b"root:x:0:0:root:/root:/bin/sh\n",
        "app/notes.txt": b"first copy SECRET-DUP-FIRST\n",
    },
    2: {
        "app/config.yml": b"db_password: SECRET-DB-PASSWORD\n",
        "var/log/app.log": b"started\n",
    },
}
HIDDEN_SECRETS = {
    "SECRET-AWS-KEY",
    "SECRET-ID-RSA",
    "SECRET-TOKEN-1",
    "SECRET-CACHE-A",
    "SECRET-DB-PASSWORD",
    "SECRET-DUP-FIRST",
    "SECRET-VIA-SYMLINK",
}


def build_incident(dest: Path, layers: int = 4) -> tuple[Path, str]:
    """The incident image (its first ``layers`` layers) as an OCI layout."""
    tars = [builder.make_layer_tar(make()) for make in INCIDENT_LAYERS[:layers]]
    every: list[builder.Compression] = ["none", "gzip", "zstd", "gzip"]
    compressions = every[:layers]
    kept = 0
    history = []
    for step in HISTORY:
        if not step.get("empty_layer"):
            kept += 1
            if kept > layers:
                break
        history.append(step)
    layout = builder.write_oci_layout(
        dest, tars, compression=compressions, tag=INCIDENT_TAG, config=CONFIG, history=history
    )
    return layout, INCIDENT_TAG


# --------------------------------------------------------------------------- raw layers


def layer_blobs(layout: Path, tag: str) -> list[tuple[str, Path]]:
    """(digest, blob path) of each layer, base first, from the manifest."""
    manifest = builder.image_manifest(layout, tag)
    return [(d["digest"], builder.blob_path(layout, d["digest"])) for d in manifest["layers"]]


@dataclass(frozen=True)
class TarLine:
    """One line of ``tar -tvf``: what GNU tar says a member is."""

    mode: str  # "-rw-r--r--", "hrw-r--r--" for a hardlink
    uid: int
    gid: int
    size: str  # bytes, or "major,minor" for devices
    mtime: str  # "2020-09-13 12:26:40[.fraction]" in UTC
    name: str
    target: str | None  # symlink target, or hardlink target member


def tar_tv(blob: Path) -> list[TarLine]:
    """``tar -tvf`` of a layer blob (GNU tar detects gzip and zstd itself)."""
    result = subprocess.run(
        ["tar", "-tvf", str(blob), "--numeric-owner", "--full-time", "--quoting-style=literal"],
        capture_output=True,
        env={"TZ": "UTC", "PATH": os.environ.get("PATH", "/usr/bin:/bin")},
        check=True,
    )
    lines = []
    for raw in os.fsdecode(result.stdout).splitlines():
        mode, owner, size, day, time, rest = raw.split(maxsplit=5)
        uid, gid = owner.split("/")
        target = None
        separator = " link to " if mode.startswith("h") else " -> "
        if mode[0] in "hl":
            rest, target = rest.split(separator, 1)
        lines.append(TarLine(mode, int(uid), int(gid), size, f"{day} {time}", rest, target))
    return lines


def tar_members(blob: Path) -> Iterator[tuple[tarfile.TarInfo, bytes | None]]:
    """Each member of a layer blob with its data (files), read with tarfile."""
    data = builder.decompress(blob.read_bytes())
    with tarfile.open(fileobj=io.BytesIO(data)) as tf:
        for info in tf:
            content = None
            if info.isreg():
                extracted = tf.extractfile(info)
                assert extracted is not None
                content = extracted.read()
            yield info, content


def clean(name: str) -> str:
    return "/".join(part for part in name.split("/") if part not in ("", "."))


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()
