"""`make demo`: build a small image, mount it, look inside, unmount.

The image is built with the test suite's own fixture builder: three layers
(plain, gzip, zstd), the second deleting a "secret" the first shipped, then
turned into a `docker save` tarball with skopeo. Every command run is printed.
"""

from __future__ import annotations

import shlex
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests import builder
from tests.builder import directory, file, symlink, whiteout

IMAGEFS = [sys.executable, "-m", "imagefs"]
OS_RELEASE = 'NAME="Demo Linux"\nID=demo\nVERSION_ID=1.0\n'
HELLO = "#!/bin/sh\necho hello from inside the image\n"


def run(*command: str | Path, check: bool = True) -> None:
    shown = " ".join(shlex.quote(str(part)) for part in command)
    print(f"\n$ {shown.replace(sys.executable + ' -m imagefs', 'imagefs')}", flush=True)
    subprocess.run([str(part) for part in command], check=check)


def build_image(workdir: Path) -> Path:
    base = builder.make_layer_tar(
        [
            directory("etc"),
            file("etc/os-release", OS_RELEASE),
            file("etc/app.conf", "password=hunter2\n", mode=0o600),
            directory("usr/bin"),
            file("usr/bin/hello", HELLO, mode=0o755),
            symlink("bin", "usr/bin"),
        ]
    )
    app = builder.make_layer_tar(
        [
            whiteout("etc/app.conf"),
            directory("srv/app", uid=1000, gid=1000),
            file("srv/app/README", "the application lives here\n", uid=1000, gid=1000),
        ]
    )
    data = builder.make_layer_tar([file("srv/app/data.bin", bytes(range(256)) * 4096)])
    layout = builder.write_oci_layout(
        workdir / "layout", [base, app, data], compression=["none", "gzip", "zstd"], tag="1.0"
    )
    return builder.to_docker_archive(layout, "1.0", workdir / "demo.tar", name="demo/app:1.0")


def main() -> int:
    with tempfile.TemporaryDirectory(prefix="imagefs-demo-") as tmp:
        workdir = Path(tmp)
        print("Building a 3-layer sample image and saving it as a docker save tarball ...")
        archive = build_image(workdir)
        mountpoint = workdir / "mnt"
        mountpoint.mkdir()
        run(*IMAGEFS, "mount", archive, mountpoint)
        try:
            run("ls", "-la", mountpoint, mountpoint / "srv/app")
            run("cat", mountpoint / "etc/os-release")
            run(mountpoint / "bin/hello", check=False)  # nosuid/noexec do not forbid plain exec
            run("find", mountpoint, "-printf", "%M %u %7s %P\\n")
            run("sha256sum", mountpoint / "srv/app/data.bin")
            print("\n# etc/app.conf was deleted by layer 2 (a whiteout), so it is not there:")
            run("ls", mountpoint / "etc", check=False)
            run("grep", "-r", "hello", mountpoint / "usr", check=False)
        finally:
            run(*IMAGEFS, "umount", mountpoint)
        print("\n# For an incident: what is this image, and what did its layers hide?")
        run(*IMAGEFS, "inspect", archive)
        run(*IMAGEFS, "mount", "--layers", archive, mountpoint)
        try:
            run("ls", mountpoint, mountpoint / "layers")
            run("grep", "-r", "password", mountpoint / "deleted", check=False)
            run("getfattr", "-n", "user.imagefs.layer_index", mountpoint / "rootfs/srv/app/README")
        finally:
            run(*IMAGEFS, "umount", mountpoint)
    print("\nDemo finished: mounted, read and unmounted without extracting anything.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
