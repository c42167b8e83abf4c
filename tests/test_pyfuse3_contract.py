"""What imagefs.daemon.operations assumes of pyfuse3, pinned against the pyfuse3 installed.

``ImageOperations.read`` answers page-cache hits with a view of a buffer that
the next cached read reuses (it saved a copy per read: cold sequential reads
went from ~0.55x to ~0.85x of a trivial server). That is only correct while
pyfuse3 copies the returned buffer to the kernel before its event loop runs
another handler, i.e. while ``fuse_read_async`` calls ``fuse_reply_buf``
right after ``await operations.read(...)``, with no await in between. pyfuse3
ships its Cython source; this test reads it, so an upgrade that changes the
reply path fails here instead of serving one read's bytes to another.
(``tests/test_stress.py`` checks the behaviour itself: 16 concurrent readers
hashing every file through the kernel.)
"""

from __future__ import annotations

import re
from pathlib import Path

import pyfuse3


def test_read_replies_before_the_loop_can_run_another_handler() -> None:
    source = (Path(pyfuse3.__file__).parent / "handlers.pxi").read_text()
    match = re.search(r"async def fuse_read_async\b.*?(?=\n(?:async def|cdef|def) )", source, re.S)
    assert match, "pyfuse3's fuse_read_async is gone: re-check ImageOperations.read's buffer reuse"
    body = match.group(0)
    handler = body.index("await operations.read(")
    reply = body.index("fuse_reply_buf(")
    between = body[handler + len("await operations.read(") : reply]
    assert "await" not in between, (
        "pyfuse3 now awaits before replying: the reused buffer may change"
    )
    assert "PyObject_GetBuffer(buf" in between  # it takes any buffer, not only bytes
