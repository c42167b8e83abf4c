"""What ``imagefs images`` lists: one image of a host's engine store, as plain data."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class StoreImage:
    """One image name in a host store (containerd, and the other engines beside it)."""

    store: str  # the transport that mounts it: "containerd"
    root: str  # the store's root directory
    namespace: str  # containerd namespace; "" for stores without namespaces
    name: str
    digest: str  # the target (manifest or index) digest the name points to
    media_type: str
    size: int | None  # target plus its children for the platform, as the engine sums; None: unknown
    created: str  # ISO 8601 UTC, "" when unrecorded
