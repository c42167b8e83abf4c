"""Read the shipped systemd units and do what systemd would do with them.

systemd is not PID 1 on a test machine (nor in a container), so the units
cannot be started by systemd itself. ``systemd-analyze verify`` checks them
as systemd loads them; this module covers the rest by running their command
lines the way systemd.service(5) and systemd.mount(5) describe: specifiers
(``%i``, ``%I``, ``%f``) expanded, ``Environment=`` and ``EnvironmentFile=``
applied, ``${VAR}`` as one word and ``$VAR`` split at whitespace, a ``-``
prefix meaning "failure is ignored". Only what the shipped units use is
supported; anything else fails loudly rather than being guessed at.
"""

from __future__ import annotations

import re
import shlex
import subprocess
from pathlib import Path

SYSTEMD_DIR = Path(__file__).resolve().parent.parent / "systemd"

Unit = dict[str, list[tuple[str, str]]]


def parse_unit(path: Path) -> Unit:
    """Sections -> (key, value) pairs in order; keys may repeat, as in unit files."""
    unit: Unit = {}
    section = None
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            section = line[1:-1]
            unit.setdefault(section, [])
            continue
        assert section is not None, f"{path}: {line!r} outside a section"
        assert not line.endswith("\\"), f"{path}: continuation lines are not supported"
        key, _, value = line.partition("=")
        unit[section].append((key.strip(), value.strip()))
    return unit


def values(unit: Unit, section: str, key: str) -> list[str]:
    return [value for name, value in unit.get(section, []) if name == key]


def value(unit: Unit, section: str, key: str) -> str:
    found = values(unit, section, key)
    assert len(found) == 1, f"[{section}] {key}= appears {len(found)} times"
    return found[0]


def escape_path(path: Path) -> str:
    return subprocess.run(
        ["systemd-escape", "--path", str(path)], capture_output=True, text=True, check=True
    ).stdout.strip()


def _unescape(instance: str) -> str:
    return subprocess.run(
        ["systemd-escape", "--unescape", instance], capture_output=True, text=True, check=True
    ).stdout.strip()


def expand_specifiers(text: str, instance: str) -> str:
    """``%i`` (instance), ``%I`` (unescaped), ``%f`` (``/`` + unescaped), ``%%``."""
    table = {"i": instance, "I": _unescape(instance), "f": "/" + _unescape(instance), "%": "%"}

    def replace(match: re.Match[str]) -> str:
        key = match[1]
        assert key in table, f"specifier %{key} is not emulated"
        return table[key]

    return re.sub(r"%(.)", replace, text)


def environment(unit: Unit, instance: str, root: Path) -> dict[str, str]:
    """``Environment=`` then ``EnvironmentFile=`` (read under ``root``), later ones winning."""
    env: dict[str, str] = {}
    for name, raw in unit["Service"]:
        if name == "Environment":
            for word in shlex.split(expand_specifiers(raw, instance)):
                key, _, val = word.partition("=")
                env[key] = val
        elif name == "EnvironmentFile":
            path = expand_specifiers(raw, instance)
            optional = path.startswith("-")
            file = root / path.removeprefix("-").lstrip("/")
            if optional and not file.exists():
                continue
            for line in file.read_text().splitlines():
                line = line.strip()
                if line and not line.startswith(("#", ";")):
                    key, _, val = line.partition("=")
                    env[key.strip()] = val.strip().strip('"')
    return env


def exec_command(line: str, instance: str, env: dict[str, str]) -> tuple[list[str], bool]:
    """An ``Exec*=`` line as argv, and whether its failure is ignored (``-``)."""
    ignore_failure = line.startswith("-")
    line = line.removeprefix("-")
    assert not line.startswith(("@", "+", "!", ":")), f"prefix not emulated: {line}"
    argv: list[str] = []
    # Words first, then specifiers in each (as systemd does): a %f holding a
    # space stays one argument.
    for raw_word in shlex.split(line):
        word = expand_specifiers(raw_word, instance)
        whole = re.fullmatch(r"\$\{(\w+)\}", word)
        split = re.fullmatch(r"\$(\w+)", word)
        if whole:
            argv.append(env.get(whole[1], ""))
        elif split:
            argv.extend(env.get(split[1], "").split())
        else:
            assert "$" not in word, f"partial variable expansion not emulated: {word}"
            argv.append(word)
    return argv, ignore_failure


def mount_command(unit: Unit, what: str | None = None, where: Path | None = None) -> list[str]:
    """What systemd runs for a ``.mount`` unit: ``mount What Where -t Type -o Options``."""
    return [
        "mount",
        what or value(unit, "Mount", "What"),
        str(where or value(unit, "Mount", "Where")),
        "-t",
        value(unit, "Mount", "Type"),
        "-o",
        value(unit, "Mount", "Options"),
    ]
