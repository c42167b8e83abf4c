"""Registry sources against a real CNCF distribution registry on 127.0.0.1.

Three registries per session: open, htpasswd basic auth, token auth (with a
token issuer the tests run). Images are pushed with skopeo; mounts are
compared with ``umoci unpack`` of the same image, as in the core tests.
Fault tests (a proxy cutting a blob, a registry serving a wrong blob, a
pull-through mirror) start their own registries.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from imagefs.registry.blobstore import BlobStore
from tests import builder
from tests.builder import directory, file
from tests.images import BuiltImage
from tests.mounting import IMAGEFS, is_mounted, mounted, run_imagefs
from tests.needs import require_fuse, require_tools
from tests.oracle import Oracle, compare, snapshot, umoci_oracle
from tests.registry import CuttingProxy, Registry, TokenIssuer

USER, PASSWORD = "alice", "s3cret-Pa55word-never-logged"
BIG = os.urandom(3 << 20)  # incompressible: a blob big enough to cut midway


@pytest.fixture(scope="session")
def registry_tools(image_tools: None) -> None:
    require_tools("docker-registry", "skopeo", "umoci")


@pytest.fixture(scope="session")
def open_registry(
    registry_tools: None, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Registry]:
    registry = Registry(tmp_path_factory.mktemp("open-registry"))
    yield registry
    registry.stop()


@pytest.fixture(scope="session")
def pushed_basic(open_registry: Registry, basic_image: BuiltImage) -> str:
    return open_registry.push(f"oci:{basic_image.layout}:{basic_image.tag}", "test/basic:1")


@pytest.fixture(scope="session")
def htpasswd_registry(
    registry_tools: None, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Registry]:
    registry = Registry(tmp_path_factory.mktemp("htpasswd-registry"), htpasswd={USER: PASSWORD})
    yield registry
    registry.stop()


@pytest.fixture(scope="session")
def token_issuer(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TokenIssuer]:
    issuer = TokenIssuer(
        tmp_path_factory.mktemp("token-issuer"),
        users={USER: PASSWORD},
        identity_tokens={"identity-token-xyz": USER},
    )
    yield issuer
    issuer.stop()


@pytest.fixture(scope="session")
def token_registry(
    registry_tools: None, token_issuer: TokenIssuer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Registry]:
    registry = Registry(tmp_path_factory.mktemp("token-registry"), token=token_issuer)
    yield registry
    registry.stop()


def small_layout(dest: Path, marker: str, compression: str = "gzip") -> Path:
    layers = [
        builder.make_layer_tar([directory("etc"), file("etc/marker", marker + "\n")]),
        builder.make_layer_tar([file("data/big.bin", BIG[:65536]), file("etc/two", "2\n")]),
    ]
    return builder.write_oci_layout(dest, layers, compression=compression, tag="t")  # type: ignore[arg-type]


def mount_compare(ref: str, oracle: Oracle, tmp_path: Path, *options: str) -> None:
    log = tmp_path / "imagefs.log"
    with mounted(ref, tmp_path / "mnt", *options, log=log) as mnt:
        actual = snapshot(mnt)
    differences = compare(oracle.records, actual)
    assert differences == [], "\n".join(differences[:50])
    assert "ERROR" not in log.read_text()


# -- open registry ---------------------------------------------------------------


def test_mount_from_registry_matches_umoci_and_second_mount_uses_cache(
    pushed_basic: str, basic_oracle: Oracle, tmp_path: Path
) -> None:
    cache = tmp_path / "cache"
    mount_compare(pushed_basic, basic_oracle, tmp_path / "first", f"--cache-dir={cache}")
    blobs = sorted((cache / "blobs" / "sha256").iterdir())
    inodes = {p.name: p.stat().st_ino for p in blobs}
    assert len(blobs) >= 5  # index-less image: manifest, config, 3 layers
    assert not list(cache.rglob("*.part"))  # no download left half-written
    # The same image again: nothing downloaded (a new download renames a new inode).
    mount_compare(pushed_basic, basic_oracle, tmp_path / "second", f"--cache-dir={cache}")
    assert {p.name: p.stat().st_ino for p in (cache / "blobs" / "sha256").iterdir()} == inodes
    # docker:// prefix and the digest form name the same image.
    repository = pushed_basic.rsplit(":", 1)[0]
    digest = BlobStore(cache).tag(repository, "1")
    by_digest = f"docker://{repository}:ignored@{digest}"  # tag and digest: the digest wins
    mount_compare(by_digest, basic_oracle, tmp_path / "third", f"--cache-dir={cache}")


def test_corrupt_cached_blob_is_detected_and_refetched(
    pushed_basic: str, basic_oracle: Oracle, tmp_path: Path
) -> None:
    cache = tmp_path / "cache"
    mount_compare(pushed_basic, basic_oracle, tmp_path / "first", f"--cache-dir={cache}")
    # Flip a byte in the largest cached blob (a layer), keeping its size.
    victim = max((cache / "blobs" / "sha256").iterdir(), key=lambda p: p.stat().st_size)
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0xFF
    victim.chmod(0o644)
    victim.write_bytes(bytes(data))
    mount_compare(pushed_basic, basic_oracle, tmp_path / "second", f"--cache-dir={cache}")
    refetched = hashlib.sha256(victim.read_bytes()).hexdigest()
    assert refetched == victim.name


def test_zstd_image_matches_umoci_of_its_gzip_copy(
    open_registry: Registry, registry_tools: None, tmp_path: Path
) -> None:
    layout = small_layout(tmp_path / "zstd", "zstd", compression="zstd")
    ref = open_registry.push(f"oci:{layout}:t", "test/zstd:1")
    gzip_copy = builder.to_gzip_layout(layout, "t", tmp_path / "gz")
    oracle = umoci_oracle(gzip_copy, "t", tmp_path / "oracle")
    mount_compare(ref, oracle, tmp_path)


def test_multiplatform_index_selection(open_registry: Registry, tmp_path: Path) -> None:
    images = {
        ("linux", "amd64", ""): [builder.make_layer_tar([file("arch", "amd64\n")])],
        ("linux", "arm64", "v8"): [builder.make_layer_tar([file("arch", "arm64\n")])],
    }
    layout = builder.write_multiplatform_layout(tmp_path / "multi", images, tag="t")
    ref = open_registry.push(f"oci:{layout}:t", "test/multi:1", "--all")
    for wanted in ("linux/amd64", "linux/arm64"):
        with mounted(ref, tmp_path / wanted.replace("/", "-"), f"--platform={wanted}") as mnt:
            assert (mnt / "arch").read_text() == wanted.split("/")[1] + "\n"
    (tmp_path / "m").mkdir()
    result = run_imagefs("mount", "--platform=linux/s390x", ref, tmp_path / "m")
    assert result.returncode == 1
    assert "no manifest for platform linux/s390x; available: linux/amd64, linux/arm64/v8" in (
        result.stderr
    )


def test_pull_offline_cache_ls_and_prune(open_registry: Registry, tmp_path: Path) -> None:
    require_fuse()
    layout = small_layout(tmp_path / "layout", "offline")
    ref = open_registry.push(f"oci:{layout}:t", "test/offline:1")
    cache = tmp_path / "cache"
    pulled = run_imagefs("pull", f"--cache-dir={cache}", ref)
    assert pulled.returncode == 0, pulled.stderr
    assert pulled.stdout.startswith(f"{ref}: sha256:")
    listing = run_imagefs("cache", "ls", f"--cache-dir={cache}")
    assert f"{ref}  sha256:" in listing.stdout and "incomplete" not in listing.stdout
    # Offline: the tag resolves to its last known digest from the cache.
    offline_ref = ref
    with mounted(offline_ref, tmp_path / "mnt", f"--cache-dir={cache}", "--offline") as mnt:
        assert (mnt / "etc" / "marker").read_text() == "offline\n"
    missing = run_imagefs(
        "mount", "--offline", f"--cache-dir={cache}", f"{open_registry.host}/test/never:1", tmp_path
    )
    assert missing.returncode == 1 and "never pulled here (--offline)" in missing.stderr
    # A blob no tag reaches goes, and so does the merged tree of an image
    # whose layers are gone; the tagged image and its tree stay.
    trees = sorted((cache / "trees").glob("*.tree"))
    assert len(trees) == 1
    stray = cache / "blobs" / "sha256" / ("0" * 64)
    stray.write_bytes(b"stray")
    orphan = cache / "trees" / ("f" * 64 + ".tree")
    orphan.write_bytes(b"not a tree")
    pruned = run_imagefs("cache", "prune", f"--cache-dir={cache}")
    assert pruned.returncode == 0 and "removed 2 files" in pruned.stdout, pruned.stdout
    assert not stray.exists() and not orphan.exists()
    assert sorted((cache / "trees").glob("*.tree")) == trees
    with mounted(offline_ref, tmp_path / "mnt2", f"--cache-dir={cache}", "--offline") as mnt:
        assert (mnt / "etc" / "two").read_text() == "2\n"
    everything = run_imagefs("cache", "prune", "--all", f"--cache-dir={cache}")
    assert everything.returncode == 0
    assert not list((cache / "blobs" / "sha256").iterdir())
    assert not list((cache / "trees").glob("*.tree"))
    assert "0 tags" in run_imagefs("cache", "ls", f"--cache-dir={cache}").stdout


def test_unknown_tag_and_invalid_reference(open_registry: Registry, tmp_path: Path) -> None:
    result = run_imagefs("mount", f"{open_registry.host}/test/absent:1", tmp_path)
    assert result.returncode == 1
    assert "not found (HTTP 404)" in result.stderr and "MANIFEST_UNKNOWN" in result.stderr.upper()
    bad = run_imagefs("mount", "Alpine:3", tmp_path)
    assert bad.returncode == 2
    assert "invalid reference 'Alpine:3': repository name must be lowercase" in bad.stderr


# -- basic auth --------------------------------------------------------------------


def test_htpasswd_registry_basic_auth(htpasswd_registry: Registry, tmp_path: Path) -> None:
    require_fuse()
    layout = small_layout(tmp_path / "layout", "basic-auth")
    ref = htpasswd_registry.push(f"oci:{layout}:t", "test/private:1", creds=f"{USER}:{PASSWORD}")
    env_home = {"DOCKER_CONFIG": str(tmp_path / "empty-docker-config")}
    (tmp_path / "m").mkdir()
    anonymous = _imagefs(["mount", ref, tmp_path / "m"], env=env_home)
    assert anonymous.returncode == 1
    assert "authentication required" in anonymous.stderr
    wrong = _imagefs(
        ["mount", "--username", USER, "--password-stdin", ref, tmp_path / "m"],
        stdin="wrong\n",
        env=env_home,
    )
    assert wrong.returncode == 1 and "credentials refused" in wrong.stderr
    # --username + --password-stdin, at debug level with a log: the password
    # shows nowhere (log, stderr, the daemon's command line).
    log = tmp_path / "debug.log"
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    ok = _imagefs(
        ["mount", "--debug", f"--log={log}", f"--cache-dir={tmp_path / 'c1'}", "--username", USER,
         "--password-stdin", ref, mnt],
        stdin=PASSWORD + "\n",
        env=env_home,
    )  # fmt: skip
    try:
        assert ok.returncode == 0, ok.stderr
        assert (mnt / "etc" / "marker").read_text() == "basic-auth\n"
        for pid in _daemon_pids(mnt):
            assert PASSWORD.encode() not in Path(f"/proc/{pid}/cmdline").read_bytes()
    finally:
        run_imagefs("umount", mnt)
    assert PASSWORD not in log.read_text() + ok.stderr + ok.stdout
    assert "Basic " not in log.read_text()
    # An auth file in Docker's config.json format ("auth": base64 user:password).
    auth_file = tmp_path / "auth.json"
    _write_docker_config(auth_file, {htpasswd_registry.host: _auth_entry(USER, PASSWORD)})
    with mounted(ref, tmp_path / "mnt2", f"--auth-file={auth_file}") as mounted_dir:
        assert (mounted_dir / "etc" / "two").read_text() == "2\n"


# -- token auth --------------------------------------------------------------------


def test_token_auth_anonymous_public_repository(
    token_registry: Registry, token_issuer: TokenIssuer, tmp_path: Path
) -> None:
    layout = small_layout(tmp_path / "layout", "public")
    ref = token_registry.push(f"oci:{layout}:t", "public/img:1", creds=f"{USER}:{PASSWORD}")
    before = len(token_issuer.requests_seen)
    env = {"DOCKER_CONFIG": str(tmp_path / "none")}
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    result = _imagefs(["mount", f"--cache-dir={tmp_path / 'c'}", ref, mnt], env=env)
    try:
        assert result.returncode == 0, result.stderr
        assert (mnt / "etc" / "marker").read_text() == "public\n"
    finally:
        run_imagefs("umount", mnt)
    fetched = token_issuer.requests_seen[before:]
    # One anonymous token for the repository, reused for manifest, config and layers.
    assert [(r["user"], r["scopes"]) for r in fetched] == [(None, ["repository:public/img:pull"])]


def test_token_auth_private_repository_credentials(
    token_registry: Registry, token_issuer: TokenIssuer, tmp_path: Path
) -> None:
    require_fuse()
    layout = small_layout(tmp_path / "layout", "private")
    ref = token_registry.push(f"oci:{layout}:t", "team/img:1", creds=f"{USER}:{PASSWORD}")
    (tmp_path / "m").mkdir()
    denied = _imagefs(["mount", ref, tmp_path / "m"], env={"DOCKER_CONFIG": str(tmp_path)})
    assert denied.returncode == 1 and "authentication required" in denied.stderr
    # credHelpers: docker-credential-NAME get, the server on stdin.
    helper_dir = tmp_path / "bin"
    helper_dir.mkdir()
    helper = helper_dir / "docker-credential-imagefstest"
    helper.write_text(
        "#!/bin/sh\nread server\n"
        f'[ "$server" = "{token_registry.host}" ] || {{ echo "credentials not found"; exit 1; }}\n'
        f'printf \'{{"ServerURL":"%s","Username":"{USER}","Secret":"{PASSWORD}"}}\' "$server"\n'
    )
    helper.chmod(0o755)
    helpers_config = tmp_path / "helpers"
    _write_docker_config(
        helpers_config / "config.json", {}, credHelpers={token_registry.host: "imagefstest"}
    )
    env = {"DOCKER_CONFIG": str(helpers_config), "PATH": f"{helper_dir}:{os.environ['PATH']}"}
    _mount_check(ref, tmp_path / "via-helper", env, "private\n")
    # credsStore: the same helper for every registry.
    store_config = tmp_path / "store"
    _write_docker_config(store_config / "config.json", {}, credsStore="imagefstest")
    env["DOCKER_CONFIG"] = str(store_config)
    _mount_check(ref, tmp_path / "via-store", env, "private\n")
    # identitytoken: the OAuth2 refresh-token grant (POST to the realm).
    identity_config = tmp_path / "identity"
    _write_docker_config(
        identity_config / "config.json",
        {token_registry.host: {"auth": "", "identitytoken": "identity-token-xyz"}},
    )
    before = len(token_issuer.requests_seen)
    _mount_check(ref, tmp_path / "via-identity", {"DOCKER_CONFIG": str(identity_config)},
                 "private\n")  # fmt: skip
    assert {r["method"] for r in token_issuer.requests_seen[before:]} == {"POST"}


# -- TLS ----------------------------------------------------------------------------


def test_tls_is_verified_and_ca_bundle_option(registry_tools: None, tmp_path: Path) -> None:
    require_fuse()
    registry = Registry(tmp_path / "tls-registry", tls=True)
    try:
        layout = small_layout(tmp_path / "layout", "tls")
        ref = registry.push(f"oci:{layout}:t", "test/tls:1")
        (tmp_path / "m").mkdir()
        untrusted = run_imagefs("mount", ref, tmp_path / "m")
        assert untrusted.returncode == 1
        assert "TLS certificate not trusted" in untrusted.stderr
        assert registry.ca is not None
        with mounted(ref, tmp_path / "mnt", f"--ca-bundle={registry.ca}") as mnt:
            assert (mnt / "etc" / "marker").read_text() == "tls\n"
    finally:
        registry.stop()


# -- faults -------------------------------------------------------------------------


def test_cut_blob_transfer_resumes_and_cache_is_clean(
    open_registry: Registry, tmp_path: Path
) -> None:
    layer = builder.make_layer_tar([file("big.bin", BIG)])
    layout = builder.write_oci_layout(tmp_path / "layout", [layer], compression="gzip", tag="t")
    open_registry.push(f"oci:{layout}:t", "test/cut:1")
    proxy = CuttingProxy(open_registry.port, cut_after=1 << 20)
    cache = tmp_path / "cache"
    try:
        log = tmp_path / "imagefs.log"
        with mounted(f"{proxy.host}/test/cut:1", tmp_path / "mnt", f"--cache-dir={cache}",
                     "--debug", log=log) as mnt:  # fmt: skip
            assert hashlib.sha256((mnt / "big.bin").read_bytes()).digest() == (
                hashlib.sha256(BIG).digest()
            )
    finally:
        proxy.stop()
    assert proxy.cuts == 1
    assert "resuming" in log.read_text()
    assert not list(cache.rglob("*.part"))  # no download left half-written
    for blob in (cache / "blobs" / "sha256").iterdir():
        assert hashlib.sha256(blob.read_bytes()).hexdigest() == blob.name


def test_registry_serving_a_wrong_blob_is_refused(registry_tools: None, tmp_path: Path) -> None:
    require_fuse()
    registry = Registry(tmp_path / "lying-registry")
    try:
        layout = small_layout(tmp_path / "layout", "lie")
        ref = registry.push(f"oci:{layout}:t", "test/lie:1")
        layer = builder.image_manifest(layout, "t")["layers"][1]
        stored = registry.blob_file(layer["digest"])
        stored.write_bytes(bytes(len(stored.read_bytes())))  # same size, wrong bytes
        cache = tmp_path / "cache"
        (tmp_path / "m").mkdir()
        result = run_imagefs("mount", f"--cache-dir={cache}", ref, tmp_path / "m")
        assert result.returncode == 1
        assert "digest" in result.stderr and layer["digest"] in result.stderr
        assert not is_mounted(tmp_path / "m")
        assert not (cache / "blobs" / "sha256" / layer["digest"].split(":")[1]).exists()
        assert not list(cache.rglob("*.part"))  # no download left half-written
    finally:
        registry.stop()


def test_pull_through_mirror_serves_the_fleet(registry_tools: None, tmp_path: Path) -> None:
    """--registry-mirror for Docker Hub names, and per-registry mirrors from the config
    file; the mirror (distribution in proxy mode) serves later mounts by itself."""
    require_fuse()
    upstream = Registry(tmp_path / "upstream")
    mirror = Registry(tmp_path / "mirror", proxy_remote=upstream.url)
    try:
        layout = small_layout(tmp_path / "layout", "fleet")
        upstream.push(f"oci:{layout}:t", "library/fleet:1")
        # Machine 1: docker.io/library/fleet:1 through the mirror (Docker Hub
        # itself is never contacted: the mirror answers).
        with mounted("fleet:1", tmp_path / "m1", f"--registry-mirror={mirror.url}") as mnt:
            assert (mnt / "etc" / "marker").read_text() == "fleet\n"
        upstream.stop()
        # Machine 2 (own cache), upstream gone: the mirror has it all.
        with mounted("fleet:1", tmp_path / "m2", f"--registry-mirror={mirror.url}") as mnt:
            assert (mnt / "data" / "big.bin").read_bytes() == BIG[:65536]
    finally:
        mirror.stop()
        upstream.stop()


def test_dead_mirror_falls_back_to_upstream(open_registry: Registry, tmp_path: Path) -> None:
    layout = small_layout(tmp_path / "layout", "fallback")
    ref = open_registry.push(f"oci:{layout}:t", "test/fallback:1")
    config = tmp_path / "registries.json"
    # Nothing listens on port 9 of the loopback: the mirror fails at once.
    config.write_text(json.dumps({"mirrors": {open_registry.host: ["http://127.0.0.1:9"]}}))
    log = tmp_path / "imagefs.log"
    with mounted(ref, tmp_path / "mnt", f"--registries-config={config}", log=log) as mnt:
        assert (mnt / "etc" / "marker").read_text() == "fallback\n"
    assert "mirror http://127.0.0.1:9 failed" in log.read_text()


# -- helpers ------------------------------------------------------------------------


def _imagefs(
    args: list[str | Path], *, stdin: str = "", env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    require_fuse()
    return subprocess.run(
        [*IMAGEFS, *map(str, args)],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, **(env or {})},
        check=False,
    )


def _mount_check(ref: str, mnt: Path, env: dict[str, str], marker: str) -> None:
    mnt.mkdir()
    result = _imagefs(["mount", f"--cache-dir={mnt}.cache", ref, mnt], env=env)
    try:
        assert result.returncode == 0, result.stderr
        assert (mnt / "etc" / "marker").read_text() == marker
    finally:
        run_imagefs("umount", mnt)


def _daemon_pids(mnt: Path) -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmdline = (entry / "cmdline").read_bytes()
            except OSError:
                continue
            if b"imagefs" in cmdline and str(mnt).encode() in cmdline:
                pids.append(int(entry.name))
    assert pids
    return pids


def _auth_entry(user: str, password: str) -> dict[str, str]:
    return {"auth": base64.b64encode(f"{user}:{password}".encode()).decode()}


def _write_docker_config(path: Path, auths: dict[str, object], **extra: object) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"auths": auths, **extra}))
