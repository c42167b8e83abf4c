"""One secure-join path resolution inside an image tree, for every caller.

The merge places each layer entry through it (its parent directory, created
where missing), whiteouts and hardlinks find their targets through it,
``imagefs which`` answers with it, and the literal walks of the ``--layers``
views and of the served tree are it with no hops allowed. It works over any
tree given as a root and a ``child(directory, name)`` look-up, so the nodes
of a merge in progress and the inodes of a finished tree share one set of
rules, which are those of extracting the layers onto one directory in a
chroot (containerd's continuity ``RootPath``, umoci's
filepath-securejoin), with the merged tree's own answer where they fail:

1. A path is root-relative; empty and ``.`` components are skipped. ``..``
   goes to the parent of the directory reached so far, that is the parent
   after every symlink on the way was followed (as the kernel and both
   secure joins do), and stays at the root at the top: nothing escapes it.
2. A symlink is followed where a directory is needed: at a component with
   more after it, and at the last one only when ``follow_last`` is set (a
   parent directory, a whiteout's directory). Otherwise the last component is
   the link itself, as ``lstat`` sees it: an entry at that path replaces the
   link. A relative target is read from the link's directory, an absolute one
   from the tree's root, never the host's.
3. A symlink is followed only if its target resolves to an existing
   directory within the hop limit. A link that does not (dangling, pointing
   at a file, a loop, too many hops) is what it looks like from outside, a
   non-directory: creating replaces it with an implied directory, exactly as
   a regular file in the way is replaced; looking up finds nothing below it.
   containerd and umoci instead follow a dangling link or a link to a file
   lexically (umoci then creates the target, or replaces the file there), and
   fail the whole unpack with ELOOP past 255 hops. An image must not be able
   to fail or hang a mount, nor make a layer write somewhere its entries do
   not name, so the entry lands under the name its layer gave, which is also
   what the kernel sees in the mounted tree.
4. The hop limit, :data:`MAX_SYMLINK_HOPS` (Linux's MAXSYMLINKS, 40), counts
   every link followed in one resolution, nested ones included, as the
   kernel counts one path walk. By rule 3 the link that exhausts it is a
   non-directory, and it is always a component named by the path itself,
   never a link met inside another link's target: for ``l0/x`` with
   ``l0 -> l1 -> ... -> l40 -> d``, 41 links, ``l0`` is replaced and the
   entry is ``l0/x`` (not ``l40/x``, and not an error).
5. A missing component, or a non-directory: creating makes an implied
   directory there (``make_directory``; it may refuse); looking up stops,
   with the rest of the path kept literally in :attr:`Resolved.names`, so the
   answer says where an entry at the path would land.

The merged tree is the reference: it is what a mount shows and what the
umoci unpack oracle agrees with (tests/test_fuzz.py, tests/test_resolve.py).
``imagefs which`` resolves in the final tree with the same function, so it
names the path a layer's entry at that path is placed at.

A literal walk (a path as a tar spells it, or one already resolved) is a
resolution with ``hop_limit=LITERAL``: by rule 3 every link met is then a
non-directory.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Generic, Protocol, TypeVar

from imagefs.layers.entry import EntryType

# Linux's bound on symlink hops while resolving one path (MAXSYMLINKS).
MAX_SYMLINK_HOPS = 40
# The hop limit of a literal walk: no symlink is followed.
LITERAL = 0


class Linked(Protocol):
    """What the resolver reads of a node: its type, and a symlink's target."""

    @property
    def type(self) -> EntryType: ...

    @property
    def target(self) -> str: ...


N = TypeVar("N", bound=Linked)

# ``child(directory, name)``: the node named ``name`` in ``directory``, or None.
ChildOf = Callable[[N, str], N | None]
# ``make_directory(parent, name, existing, names)``: put a directory at
# ``name`` in ``parent`` in place of ``existing`` (None: nothing there), and
# return it, or None to refuse. ``names`` is the resolved path of ``parent``.
MakeDirectory = Callable[[N, str, N | None, tuple[str, ...]], N | None]


@dataclass(frozen=True, slots=True)
class Resolved(Generic[N]):
    """What a path resolves to: the node there, and the path it was found at.

    ``names`` are the components of the resolved path (symlinks followed).
    When nothing is there (``node`` is None), they are the resolved part
    followed by the rest of the path as given: where the path would land.
    """

    node: N | None
    names: tuple[str, ...]

    @property
    def path(self) -> str:
        return "/".join(self.names)


def resolve(
    root: N,
    path: str,
    child: ChildOf[N],
    *,
    follow_last: bool = False,
    make_directory: MakeDirectory[N] | None = None,
    hop_limit: int = MAX_SYMLINK_HOPS,
) -> Resolved[N]:
    """Resolve the root-relative ``path`` below ``root`` (module docstring).

    ``follow_last``: resolve the last component as a directory, following a
    symlink there (rule 2). ``make_directory``: create missing and
    non-directory components (rule 5); without it nothing is changed.
    ``hop_limit``: at most this many symlinks followed (rule 4).
    Iterative, so neither deep paths nor long chains reach a recursion limit.
    """
    todo = [part for part in reversed(path.split("/")) if part and part != "."]
    stack = [root]  # the directories walked: stack[-1] is the current one
    names: list[str] = []  # stack[1:]'s names
    hops = 0
    # While following a link that ``path`` itself names: how much of ``path``
    # is left after it, and the walk as it stood there (rules 3 and 4).
    saved: tuple[int, list[N], list[str], str, N] | None = None
    while todo or saved is not None:
        if saved is not None and len(todo) == saved[0]:
            saved = None  # the link led to a directory: carry on from there
            continue
        name = todo.pop()
        if name == "..":
            if len(stack) > 1:
                stack.pop()
                names.pop()
            continue
        found = child(stack[-1], name)
        if saved is None and not todo and not follow_last:
            return Resolved(found, (*names, name))
        if found is not None:
            kind = found.type
            if kind is EntryType.DIRECTORY:
                stack.append(found)
                names.append(name)
                continue
            if kind is EntryType.SYMLINK and hops < hop_limit:
                hops += 1
                if saved is None:
                    saved = (len(todo), stack.copy(), names.copy(), name, found)
                target = found.target
                if target.startswith("/"):
                    del stack[1:]
                    names.clear()
                todo.extend(part for part in reversed(target.split("/")) if part and part != ".")
                continue
        # ``name`` is missing, not a directory, or a symlink not followed.
        if saved is not None:
            # The link named by the path leads to no directory: it is the
            # non-directory in the way, not anything met inside its target.
            depth, stack, names, name, link = saved
            found = link
            del todo[depth:]
            saved = None
        made = None
        if make_directory is not None:
            made = make_directory(stack[-1], name, found, tuple(names))
        if made is None:
            return Resolved(None, (*names, name, *reversed(todo)))
        stack.append(made)
        names.append(name)
    return Resolved(stack[-1], tuple(names))
