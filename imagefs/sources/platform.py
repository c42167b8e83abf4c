"""Platforms: parsing ``os/arch[/variant]``, the host's platform, index selection.

Normalisation and matching follow containerd's ``platforms`` package (which
Docker uses): architecture aliases (``x86_64`` -> ``amd64``, ``aarch64`` ->
``arm64``), ``arm64`` with variant ``v8`` equal to ``arm64`` without one,
bare ``arm`` meaning ``arm/v7``, and an older variant of the same
architecture acceptable when the wanted one is absent (an ``arm/v7`` host
runs ``arm/v6`` images), the newest compatible variant preferred.
"""

from __future__ import annotations

import platform as _pyplatform
import re
import sys

from imagefs.errors import UsageError
from imagefs.image import Platform

# One path component of a platform string: what containerd's parser accepts.
_COMPONENT_RE = re.compile(r"^[A-Za-z0-9_.-]+$")

# Python's platform.machine() (uname -m) -> (GOARCH, variant), as Go names them.
_MACHINE_ARCH: dict[str, tuple[str, str]] = {
    "x86_64": ("amd64", ""),
    "amd64": ("amd64", ""),
    "aarch64": ("arm64", "v8"),
    "arm64": ("arm64", "v8"),
    "armv8l": ("arm", "v8"),
    "armv7l": ("arm", "v7"),
    "armv6l": ("arm", "v6"),
    "armv5tel": ("arm", "v5"),
    "i386": ("386", ""),
    "i486": ("386", ""),
    "i586": ("386", ""),
    "i686": ("386", ""),
    "ppc64le": ("ppc64le", ""),
    "ppc64": ("ppc64", ""),
    "s390x": ("s390x", ""),
    "riscv64": ("riscv64", ""),
    "mips64": ("mips64", ""),
    "loongarch64": ("loong64", ""),
}


def _normalize_os(os_name: str) -> str:
    os_name = os_name.lower()
    # containerd: "macos" is an alias of darwin.
    return "darwin" if os_name == "macos" else os_name


def _normalize_arch(arch: str, variant: str) -> tuple[str, str]:
    """containerd ``normalizeArch``: canonical (architecture, variant)."""
    arch, variant = arch.lower(), variant.lower()
    if arch == "i386":
        return "386", ""
    if arch in ("x86_64", "x86-64", "amd64"):
        return "amd64", "" if variant == "v1" else variant
    if arch in ("aarch64", "arm64"):
        # arm64 without a variant *is* v8: both spellings must match.
        if variant in ("8", "v8", "v8.0"):
            variant = ""
        elif variant in ("9", "9.0", "v9.0"):
            variant = "v9"
        return "arm64", variant
    if arch == "armhf":
        return "arm", "v7"
    if arch == "armel":
        return "arm", "v6"
    if arch == "arm":
        if variant in ("", "7"):
            variant = "v7"
        elif variant in ("5", "6", "8"):
            variant = "v" + variant
        return "arm", variant
    return arch, variant


def normalize(p: Platform) -> Platform:
    """The canonical form used for comparisons (not for display)."""
    arch, variant = _normalize_arch(p.architecture, p.variant)
    return Platform(_normalize_os(p.os), arch, variant)


def parse_platform(text: str) -> Platform:
    """Parse ``os/arch`` or ``os/arch/variant`` (``linux/arm64/v8``).

    Architecture aliases are normalised (``linux/x86_64`` -> ``linux/amd64``)
    but an explicit variant is kept as written, as ``docker --platform`` does.
    """
    parts = text.split("/")
    if not 2 <= len(parts) <= 3 or not all(_COMPONENT_RE.match(p) for p in parts):
        raise UsageError(
            f"invalid platform {text!r}: expected OS/ARCH or OS/ARCH/VARIANT, "
            "for example linux/amd64 or linux/arm64/v8"
        )
    os_name = _normalize_os(parts[0])
    if len(parts) == 2:
        arch, variant = _normalize_arch(parts[1], "")
        if arch == "arm" and variant == "v7":
            variant = ""  # containerd's Parse: plain "linux/arm" stays unqualified
        return Platform(os_name, arch, variant)
    arch, variant = _normalize_arch(parts[1], parts[2])
    if arch == "arm64" and not variant:
        variant = "v8"  # containerd's Parse keeps the explicit v8
    return Platform(os_name, arch, variant)


def host_platform() -> Platform:
    """This machine's platform, as containerd's ``platforms.DefaultSpec`` reports it."""
    os_name = "linux" if sys.platform.startswith("linux") else sys.platform
    machine = _pyplatform.machine().lower()
    arch, variant = _MACHINE_ARCH.get(machine, (machine, ""))
    return Platform(os_name, arch, variant)


def _variant_rank(variant: str) -> int | None:
    """``vN`` -> N; "" -> 0 (the baseline); anything else is not comparable."""
    if not variant:
        return 0
    match = re.fullmatch(r"v(\d+)", variant)
    return int(match.group(1)) if match else None


def match_rank(candidate: Platform, wanted: Platform) -> int | None:
    """How well ``candidate`` serves ``wanted``: higher is better, None is no match.

    Same OS and architecture are required. The exact variant ranks highest;
    an older variant of the same architecture still runs (containerd's
    ``Only`` matcher: arm/v7 accepts v6 and v5, amd64/v3 accepts v2 and v1).
    """
    c, w = normalize(candidate), normalize(wanted)
    if c.os != w.os or c.architecture != w.architecture:
        return None
    if c.variant == w.variant:
        return 1000
    c_rank, w_rank = _variant_rank(c.variant), _variant_rank(w.variant)
    if c_rank is None or w_rank is None or c_rank > w_rank:
        return None
    if c.architecture == "arm" and c_rank < 5:
        return None  # arm/v4 and older are not runnable by any supported host
    return c_rank
