"""Session fixtures: the catalog images, built once, in every shape, with their oracles.

Building needs umoci and skopeo (Debian packages; missing ones skip, or fail
under ``CI=true``, see tests.needs) and root (umoci keeps owners and device
nodes only as root).
"""

from __future__ import annotations

import os

import pytest

from tests.images import BuiltImage, Catalog, ShapesFor
from tests.needs import require_tools
from tests.oracle import Oracle


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
