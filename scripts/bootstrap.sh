#!/bin/bash
# Installs what imagefs needs to build, test and demo, from nothing, on Debian 12.
# Idempotent: a second run only checks.
set -euo pipefail
cd "$(dirname "$0")/.."

# Debian packages: FUSE (runtime + headers to build pyfuse3), the test peers
# (umoci, skopeo, the CNCF distribution registry) and the small tools tests use.
# The Linux-integration tests also need mount(8) (mount), systemd-analyze and
# systemd-escape (systemd; it need not run as PID 1), unshare/nsenter/setpriv
# (util-linux), useradd (passwd) and strace (the daemon-never-follows-symlinks test).
# The engines whose outputs tests mount (tests/engines.py, tests/producers.py):
# podman (save in four formats, -m), buildah (the same containers-storage),
# containerd (its ctr exports; it also serves dockerd), stargz-snapshotter
# (ctr-remote's eStargz and zstd:chunked conversions), docker.io (dockerd 20.10
# and /usr/bin/docker: docker save). runc is the OCI runtime containerd and
# dockerd look for at start (no test runs a container). Rootless extras
# (fuse-overlayfs, slirp4netns, uidmap) are not needed: the engines run as root.
APT_PACKAGES=(fuse3 libfuse3-dev pkg-config gcc umoci skopeo docker-registry zstd attr file tar gzip
    mount util-linux systemd passwd coreutils strace
    podman buildah containerd stargz-snapshotter docker.io runc)
missing=()
for pkg in "${APT_PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "ok installed" || missing+=("$pkg")
done
if ((${#missing[@]})); then
    if [[ $(id -u) -ne 0 ]]; then
        echo "bootstrap: missing Debian packages (run as root to install): ${missing[*]}" >&2
        exit 1
    fi
    echo "bootstrap: installing ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# The virtual environment, rebuilt when pyproject.toml changes.
PYTHON=${PYTHON:-python3}
stamp=.venv/.installed
if [[ ! -f $stamp || pyproject.toml -nt $stamp ]]; then
    echo "bootstrap: creating virtual environment .venv"
    [[ -x .venv/bin/python ]] || "$PYTHON" -m venv .venv
    .venv/bin/python -m pip install -q --upgrade pip
    .venv/bin/python -m pip install -q -e '.[dev]'
    touch "$stamp"
fi

# Bytecode for the package, as a (non-editable) pip install writes it: an
# editable install leaves it to the first import, which skips it under
# PYTHONDONTWRITEBYTECODE (set on CI machines), and then every `imagefs` run
# compiles all its modules again: 0.25 s of each mount's start here. Only
# sources newer than their bytecode are compiled.
.venv/bin/python -m compileall -q imagefs
