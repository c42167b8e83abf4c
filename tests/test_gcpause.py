"""tree.gcpause: the cyclic collector is off inside, and back as it was after."""

from __future__ import annotations

import gc

import pytest

from imagefs.tree.gcpause import gc_paused


def test_the_collector_is_off_inside_and_back_after() -> None:
    assert gc.isenabled()
    with gc_paused():
        assert not gc.isenabled()
        with gc_paused():  # nested: the inner exit must not turn it back on
            assert not gc.isenabled()
        assert not gc.isenabled()
    assert gc.isenabled()


def test_back_after_an_error_and_left_off_if_it_was_off() -> None:
    with pytest.raises(RuntimeError), gc_paused():
        raise RuntimeError("a layer failed")
    assert gc.isenabled()
    gc.disable()
    try:
        with gc_paused():
            pass
        assert not gc.isenabled()
    finally:
        gc.enable()
