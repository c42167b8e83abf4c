"""Session fixtures: the catalog images, built once, in every shape, with their oracles;
the engines (tests.engines), each started once, and a registry feeding them;
and a check that the session left the host's engine paths alone.

Building needs umoci and skopeo (Debian packages; missing ones skip, or fail
under ``CI=true``, see tests.needs) and root (umoci keeps owners and device
nodes only as root). The engines need root and their own packages likewise.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.engines import PROTECTED_HOST_PATHS, Containerd, CtrRemote, Dockerd, Podman, Skopeo
from tests.images import BuiltImage, Catalog, ShapesFor
from tests.needs import require_tools
from tests.oracle import Oracle, state_changes, tree_state
from tests.producers import RegistryImages
from tests.registry import Registry


@pytest.fixture(scope="session", autouse=True)
def host_engine_paths_untouched() -> Iterator[None]:
    """Fail the run if any of tests.engines.PROTECTED_HOST_PATHS appeared or changed.

    Every engine a test runs must write into its own temporary directories
    (tests.engines); a regression (a tool run outside them, an engine writing
    somewhere new) shows here, at the end of the session, as an error naming
    the paths. Another process on the machine writing there meanwhile (an
    engine of the host, another test session) trips it too.
    """
    before = {path: tree_state(Path(path), contents=False) for path in PROTECTED_HOST_PATHS}
    yield
    changes = []
    for path in PROTECTED_HOST_PATHS:
        after = tree_state(Path(path), contents=False)
        changes += [f"{path}: {change}" for change in state_changes(before[path], after)]
    if changes:
        more = f"; and {len(changes) - 20} more" if len(changes) > 20 else ""
        shown = "; ".join(changes[:20]) + more
        pytest.fail(f"the test session wrote on the host: {shown}", pytrace=False)


@pytest.fixture(scope="session")
def image_tools() -> None:
    """umoci, skopeo and GNU tar are here, and we are root (umoci keeps owners only so)."""
    require_tools("umoci", "skopeo", "tar")
    if os.geteuid() != 0:
        reason = "building fixture images needs root"
        if os.environ.get("CI") == "true":
            pytest.fail(f"{reason}, and CI=true forbids skipping")
        pytest.skip(reason)


@pytest.fixture(scope="session")
def catalog(image_tools: None, tmp_path_factory: pytest.TempPathFactory) -> Catalog:
    return Catalog(tmp_path_factory.mktemp("catalog"))


@pytest.fixture(scope="session")
def basic_image(catalog: Catalog) -> BuiltImage:
    return catalog.image("basic")


@pytest.fixture(scope="session")
def edge_image(catalog: Catalog) -> BuiltImage:
    return catalog.image("edge")


@pytest.fixture(scope="session")
def image_shapes(catalog: Catalog) -> ShapesFor:
    """``image_shapes(image)["docker25"]`` -> a SOURCE string; converts on first use."""
    return catalog.shapes


@pytest.fixture(scope="session")
def basic_oracle(catalog: Catalog) -> Oracle:
    """``umoci unpack`` of the basic image: ``.rootfs`` and its snapshot ``.records``."""
    return catalog.oracle("basic")


@pytest.fixture(scope="session")
def edge_oracle(catalog: Catalog) -> Oracle:
    return catalog.oracle("edge")


@pytest.fixture(scope="session")
def store_image(catalog: Catalog) -> BuiltImage:
    """The image the host stores hold (tests.images ``store``)."""
    return catalog.image("store")


@pytest.fixture(scope="session")
def store_oracle(catalog: Catalog) -> Oracle:
    return catalog.oracle("store")


# --------------------------------------------------------------------------- engines


@pytest.fixture(scope="session")
def skopeo(tmp_path_factory: pytest.TempPathFactory) -> Skopeo:
    return Skopeo(tmp_path_factory.mktemp("skopeo"))


@pytest.fixture(scope="session")
def engine_registry(
    image_tools: None, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Registry]:
    """The loopback registry the engines pull from (plain HTTP, no auth)."""
    registry = Registry(tmp_path_factory.mktemp("engine-registry"))
    yield registry
    registry.stop()


@pytest.fixture(scope="session")
def registry_images(engine_registry: Registry, skopeo: Skopeo) -> RegistryImages:
    """``registry_images.ref(image)``: the catalog image pushed there (once)."""
    return RegistryImages(engine_registry, skopeo)


@pytest.fixture(scope="session")
def containerd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Containerd]:
    with Containerd(tmp_path_factory.mktemp("containerd")) as daemon:
        yield daemon


@pytest.fixture(scope="session")
def ctr_remote(containerd: Containerd) -> CtrRemote:
    return CtrRemote(containerd)


@pytest.fixture(scope="session")
def dockerd(
    tmp_path_factory: pytest.TempPathFactory, containerd: Containerd, engine_registry: Registry
) -> Iterator[Dockerd]:
    directory = tmp_path_factory.mktemp("dockerd")
    with Dockerd(directory, containerd, insecure=[engine_registry.host]) as daemon:
        yield daemon


@pytest.fixture(scope="session")
def podman(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Podman]:
    with Podman(tmp_path_factory.mktemp("podman")) as engine:
        yield engine
