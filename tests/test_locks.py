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


def test_with_attribute_holds_only_while_the_flow_runs():
    """A flow run under ``with_attribute`` sees the value in each stretch; while it is paused
    at a race point everything else sees the real attribute. Closing it closes the flow."""
    from types import SimpleNamespace

    from kvmcore.locks import with_attribute

    obj = SimpleNamespace()
    seen, closed = [], []

    def flow():
        try:
            seen.append(obj.__dict__.get("x"))
            yield "p1"
            seen.append(obj.__dict__.get("x"))
            yield "p2"
            return "done"
        finally:
            closed.append(True)

    g = with_attribute(flow(), obj, "x", 1)
    assert next(g) == "p1" and "x" not in obj.__dict__
    assert g.send(None) == "p2" and "x" not in obj.__dict__
    with pytest.raises(StopIteration) as end:
        next(g)
    assert end.value.value == "done" and seen == [1, 1] and closed == [True]
    g = with_attribute(flow(), obj, "x", 2)
    next(g)
    g.close()
    assert closed == [True, True] and "x" not in obj.__dict__


def test_a_flow_closed_inside_cond_resched_is_not_an_unlock_by_a_stranger():
    """A flow killed where cond_resched dropped the lock holds nothing: the ``finally`` of
    its caller, which releases the lock it took, changes nothing (it used to raise 'not its
    holder', from the garbage collector when the explorer left a schedule there)."""
    lock = RwLock()

    def flow():
        yield from lock.write_lock("lock_wait")
        try:
            yield from lock.cond_resched(WRITE, "resched")
        finally:
            lock.write_unlock()

    f = Flow("f", flow())
    points = [next(f), next(f)]
    assert points == ["lock_wait", "resched"] and not lock.held
    def holder():
        yield from lock.write_lock("other_wait")
        yield "holding"

    other = Flow("other", holder())
    assert [next(other), next(other)] == ["other_wait", "holding"] and lock.held
    f.close()
    assert lock.held and f.done
