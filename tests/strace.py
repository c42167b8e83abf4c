"""Read ``strace -f -ff -y`` logs: which paths each system call looked up, and how.

strace (6.1 here) writes one log per process with ``-ff`` (so no call is
split into ``<unfinished ...>`` halves), and with ``-y`` it prints the path
behind every descriptor, ``AT_FDCWD`` included: ``openat2(3</store>,
"a/b", {flags=..., resolve=RESOLVE_NO_SYMLINKS|RESOLVE_BENEATH}, 24) =
5</store/a/b>``. :func:`read_calls` turns such lines into :class:`Call`
records: the call, each path it named joined onto the directory it was
relative to, and the descriptors' paths. Strings are C-escaped (``\\303``
for a UTF-8 byte); they are decoded to the bytes the call passed.

Which argument is a path comes from the syscall's signature (:data:`PATHS`);
a call of ``-e trace=%file`` missing there has every string argument taken
for a path, which can only make the checks stricter.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

# (descriptor argument or None for the cwd, path argument), per path a call looks up.
PATHS: dict[str, tuple[tuple[int | None, int], ...]] = {
    **dict.fromkeys(
        ["openat", "openat2", "newfstatat", "fstatat64", "statx", "readlinkat", "faccessat",
         "faccessat2", "mkdirat", "mknodat", "unlinkat", "fchownat", "fchmodat", "futimesat",
         "utimensat", "name_to_handle_at", "execveat", "open_tree", "move_mount",
         "fsconfig"],
        ((0, 1),),
    ),
    **dict.fromkeys(["renameat", "renameat2", "linkat"], ((0, 1), (2, 3))),
    "symlinkat": ((1, 2),),  # (target, newdirfd, linkpath): the target is not looked up
    "symlink": ((None, 1),),
    **dict.fromkeys(["rename", "link"], ((None, 0), (None, 1))),
    "readlink": ((None, 0),),  # the second string is what it read
    "inotify_add_watch": ((None, 1),),
    **dict.fromkeys(
        ["getxattr", "lgetxattr", "setxattr", "lsetxattr", "listxattr", "llistxattr",
         "removexattr", "lremovexattr"],
        ((None, 0),),
    ),
}  # fmt: skip
DESCRIPTOR = re.compile(r"^(?:-?\d+|AT_FDCWD)<(.*)>$", re.DOTALL)
_ESCAPES = {"n": 10, "t": 9, "r": 13, "v": 11, "f": 12, "a": 7, "b": 8, '"': 34, "\\": 92}


@dataclass(frozen=True)
class Lookup:
    """One path a call named: where it was relative to, as given, and joined."""

    base: str | None  # the directory (a descriptor's path, or the cwd); None: not known
    given: str
    resolved: str  # ``base/given`` normalised lexically (or ``given`` if absolute)


@dataclass(frozen=True)
class Call:
    pid: int
    name: str
    args: tuple[str, ...]  # raw, as strace printed them
    result: str  # what follows " = "
    lookups: tuple[Lookup, ...]
    line: str

    @property
    def rest(self) -> str:
        """The arguments that are not paths or descriptors (flags, modes, structures)."""
        return ", ".join(self.args)

    def descriptor_paths(self) -> list[str]:
        """Every path strace showed behind a descriptor, in the arguments and the result."""
        found = [match.group(1) for arg in self.args if (match := DESCRIPTOR.match(arg))]
        result = re.match(r"(-?\d+)<(.*)>", self.result)
        if result:
            found.append(result.group(2))
        return [decode(path) for path in found]

    @property
    def failed(self) -> bool:
        return self.result.startswith("-1 ")


def read_calls(prefix: Path, cwd: Path | None = None) -> list[Call]:
    """Every traced call in the logs ``PREFIX.<pid>`` (strace ``-ff -o PREFIX``).

    ``cwd`` is where a relative path of a call without a directory descriptor
    (``stat``, ``access``...) is taken to start: the traced processes' working
    directory, if the caller knows it (and checks that no ``chdir`` changed it).
    """
    calls: list[Call] = []
    for log in sorted(prefix.parent.glob(prefix.name + ".*")):
        pid = int(log.suffix[1:])
        for line in log.read_text(errors="surrogateescape").splitlines():
            call = parse(pid, line, None if cwd is None else str(cwd))
            if call is not None:
                calls.append(call)
    return calls


def parse(pid: int, line: str, cwd: str | None = None) -> Call | None:
    """One log line; None for what is no complete call (signals, exits)."""
    match = re.match(r"^([a-z_0-9]+)\(", line)
    if match is None:
        return None
    args, end = _split_args(line, match.end())
    if end is None:
        return None
    result = line[end:].partition(" = ")[2]
    name = match.group(1)
    return Call(pid, name, tuple(args), result, tuple(_lookups(name, args, cwd)), line)


def _split_args(line: str, start: int) -> tuple[list[str], int | None]:
    """The top-level arguments from ``start`` (just after the ``(``), and where ``)`` ends."""
    args: list[str] = []
    depth, current, i = 0, [], start
    while i < len(line):
        char = line[i]
        if char == '"':
            end = i + 1
            while end < len(line) and line[end] != '"':
                end += 2 if line[end] == "\\" else 1
            current.append(line[i : end + 1])
            i = end + 1
            # "..." after a string: strace cut it (raise -s); keep the mark.
            continue
        if char == "<" and current and re.search(r"(\d|AT_FDCWD)$", "".join(current)):
            end = line.find(">", i)
            if end < 0:
                return args, None
            current.append(line[i : end + 1])
            i = end + 1
            continue
        if char in "{[(":
            depth += 1
        elif char in "}])":
            if depth == 0:
                args.append("".join(current).strip())
                return [arg for arg in args if arg], i + 1
            depth -= 1
        elif char == "," and depth == 0:
            args.append("".join(current).strip())
            current = []
            i += 1
            continue
        current.append(char)
        i += 1
    return args, None


def decode(text: str) -> str:
    """A C-escaped strace string (without its quotes) as the file name it stands for."""
    out = bytearray()
    i = 0
    raw = text.encode("utf-8", "surrogateescape")
    while i < len(raw):
        byte = raw[i]
        if byte != 0x5C or i + 1 == len(raw):
            out.append(byte)
            i += 1
            continue
        following = chr(raw[i + 1])
        if following == "x":
            out.append(int(raw[i + 2 : i + 4], 16))
            i += 4
        elif following.isdigit():
            digits = re.match(rb"[0-7]{1,3}", raw[i + 1 : i + 4])
            assert digits is not None
            out.append(int(digits.group(), 8))
            i += 1 + len(digits.group())
        else:
            out.append(_ESCAPES.get(following, ord(following)))
            i += 2
    return os.fsdecode(bytes(out))


def _string(arg: str) -> str | None:
    if len(arg) >= 2 and arg.startswith('"') and arg.endswith('"'):
        return decode(arg[1:-1])
    if arg.startswith('"') and arg.endswith('"...'):
        return decode(arg[1:-4])
    return None


def _lookups(name: str, args: list[str], cwd: str | None) -> Iterator[Lookup]:
    for arg in args:  # any AT_FDCWD<...> shows the cwd
        if arg.startswith("AT_FDCWD<") and (match := DESCRIPTOR.match(arg)):
            cwd = decode(match.group(1))
    positions = PATHS.get(name)
    if positions is None:
        positions = tuple((None, i) for i, arg in enumerate(args) if _string(arg) is not None)
    for base_at, path_at in positions:
        if path_at >= len(args):
            continue
        given = _string(args[path_at])
        if given is None:  # NULL
            continue
        base = cwd
        if base_at is not None and base_at < len(args):
            match = DESCRIPTOR.match(args[base_at])
            base = decode(match.group(1)) if match else None
        if given.startswith("/"):
            resolved = os.path.normpath(given)
        elif base is None:
            resolved = given
        else:
            resolved = os.path.normpath(os.path.join(base, given)) if given else base
        yield Lookup(base, given, resolved)


def within(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip("/") + "/")
