"""The lock and flow primitives (kvmcore.locks) on their own: who may take an rwlock, what a
flow holds, and how a flow ends when it is run and when it is stepped."""

import pytest

from kvmcore.locks import READ, WRITE, Flow, RwLock, WouldBlock


def _holding(lock: RwLock, mode: str, point: str = "holding"):
    """A flow that takes ``lock`` in ``mode`` at its first point and holds it at its second."""
    yield from (lock.read_lock if mode == READ else lock.write_lock)("take")
    try:
        yield point
    finally:
        (lock.read_unlock if mode == READ else lock.write_unlock)()


def test_readers_share_a_writer_excludes_and_a_spinlock_is_exclusive():
    lock = RwLock("mmu_lock")
    a, b = Flow("a", _holding(lock, READ)), Flow("b", _holding(lock, READ))
    assert [next(a), next(a), next(b), next(b)] == ["take", "holding", "take", "holding"]
    assert lock.holders() == [a, b] and a.holds == ["mmu_lock(read)"]
    w = Flow("w", _holding(lock, WRITE))
    assert next(w) == "take" and not w.runnable
    with pytest.raises(WouldBlock, match="needs mmu_lock"):
        next(w)
    a.run(), b.run()
    assert next(w) == "holding" and lock.writer is w and w.holds == ["mmu_lock(write)"]
    assert not lock.try_lock(READ)
    w.run()
    assert not lock.held and w.held == []

    spin = RwLock("ppc_mmu_lock", exclusive=True)
    r1, r2 = Flow("r1", _holding(spin, READ)), Flow("r2", _holding(spin, READ))
    next(r1), next(r1), next(r2)
    assert not r2.runnable and not spin.try_lock(READ)
    r1.run()
    assert next(r2) == "holding"


def test_taking_a_lock_twice_is_a_flow_bug_and_changes_nothing():
    lock = RwLock()

    def twice(mode):
        with lock(mode):
            with lock(mode):
                yield "never"

    for mode in (READ, WRITE):
        flow = Flow(f"twice-{mode}", twice(mode))
        with pytest.raises(RuntimeError, match="while it holds it"):
            flow.run()
        assert not lock.held and flow.held == [] and flow.done


def test_a_run_flow_returns_its_result_and_a_stepped_one_stops_with_it():
    def body():
        yield "point"
        return 42

    assert Flow("run", body()).run() == 42
    stepped = Flow("stepped", body())
    assert next(stepped) == "point"
    with pytest.raises(StopIteration) as stop:
        next(stepped)
    assert stop.value.value == 42 and stepped.done and stepped.result == 42
    assert stepped.run() == 42                  # an ended flow keeps its result
