"""The daemon never opens or follows a path named by the image (syscall level).

strace watches every path-taking system call of the daemon while a reader
walks the mount, reads symlinks that point at host files, and reads through
them. The kernel resolves a symlink for the *reader*, in the reader's own
namespace, as for any file system; the daemon must only ever touch its own
blobs, cache files and /dev/fuse.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from pathlib import Path

from tests import builder
from tests.builder import directory, file, symlink
from tests.mounting import mounted
from tests.needs import require_tools
from tests.test_mount import daemon_pid

HOST_TARGETS = ("/etc/shadow", "/etc/passwd", "/etc/hostname", "/proc/self/environ")
# Path-taking calls (if the daemon resolved an image path, it would show here),
# plus pread64/preadv2 as the positive control: the daemon reading its blob.
SYSCALLS = ",".join(
    [
        "trace=open", "openat", "openat2", "stat", "lstat", "newfstatat", "statx",
        "readlink", "readlinkat", "access", "faccessat", "faccessat2", "execve", "chdir",
        "pread64", "preadv2",
    ]
)  # fmt: skip


def test_daemon_never_touches_paths_the_image_names(tmp_path: Path) -> None:
    require_tools("strace")
    layer = builder.make_layer_tar(
        [
            directory("etc"),
            symlink("etc/shadow-link", "/etc/shadow"),
            symlink("host-name", "/etc/hostname"),
            symlink("environ", "/proc/self/environ"),
            symlink("rel-escape", "../../../../etc/passwd"),
            file("etc/passwd", "root:x:0:0:image:/root:/bin/sh\n" * 200),
        ]
    )
    layout = builder.write_oci_layout(tmp_path / "layout", [layer], compression="none", tag="t")
    log = tmp_path / "strace.log"
    with mounted(f"oci:{layout}:t", tmp_path / "mnt") as mnt:
        pid = daemon_pid(mnt)
        tracer = subprocess.Popen(
            ["strace", "-f", "-qq", "-e", SYSCALLS, "-o", str(log), "-p", str(pid)],
            stderr=subprocess.DEVNULL,
        )
        try:
            for _ in range(200):  # until strace is attached (it logs nothing before)
                if Path(f"/proc/{pid}/status").read_text().find("TracerPid:\t0") < 0:
                    break
                time.sleep(0.05)
            for path in sorted(mnt.rglob("*")):
                os.lstat(path)
                if path.is_symlink():
                    os.readlink(path)
                    try:  # the *reader* follows it, in its own namespace
                        path.read_bytes() if path.is_file() else os.listdir(path)
                    except OSError:
                        pass
                elif path.is_file():
                    path.read_bytes()
        finally:
            tracer.send_signal(signal.SIGINT)
            tracer.wait(timeout=60)
    calls = log.read_text()
    touched = set(re.findall(r'"([^"]*)"', calls))
    for target in HOST_TARGETS:
        assert not any(target in path for path in touched), (target, sorted(touched))
    assert not any("shadow-link" in path or "host-name" in path for path in touched)
    # The trace did record the daemon at work: it read the image's blob.
    assert re.search(r"\bpread(64|v2)\(", calls), calls[:2000]
