"""Locks, SRCU and waits as state, and the flows that hold them.

A *flow* is one Linux thread of execution as the MMU sees it: a vCPU in KVM_RUN taking a fault,
a host task whose mm change runs the MMU notifiers, a VMM thread in an ioctl. Each flow is
written once, as a generator that yields a named *race point* wherever Linux lets another
thread run: where it drops a lock, waits for one, sleeps, or installs an entry with a
compare-and-exchange under a shared lock. Between two steps the flow holds exactly what Linux
holds at that point (``Flow.holds``).

A flow that must take a lock yields *before* taking it (the point is named ``..._lock_wait``)
with ``Flow.wait`` saying what it needs; it is *runnable* only when that is free. A plain
call (``vm.set_memory_attributes(...)``) drives the same generator to its end; when a paused
flow holds what it needs, Linux would sleep or spin until that flow moves, and one plain call
cannot, so it raises ``WouldBlock`` naming the holder. A scheduler (the explorer, a test)
asks ``Flow.runnable`` and only resumes runnable flows.

What the model leaves out: there is no SMP memory ordering (a stretch between two race points
runs atomically), rwlocks have no writer preference (a queued writer does not hold off new
readers), and SRCU grace periods end as soon as the readers that predate them are gone.

Linux: include/linux/rwlock.h, kernel/locking/mutex.c, include/linux/srcu.h
(``srcu_read_lock``, ``synchronize_srcu_expedited``), virt/kvm/kvm_mm.h (``KVM_MMU_LOCK``).
"""

from __future__ import annotations

import weakref
from itertools import count

READ, WRITE = "read", "write"


class WouldBlock(RuntimeError):
    """A flow needs a lock or a wait that a paused flow holds. From a plain call, ``flow`` is
    the call's own flow, left paused where Linux's thread would sleep (holding what it
    holds): run it on (``flow.run()``) once the holder has moved, or ``close()`` it."""

    def __init__(self, message: str, flow: Flow | None = None):
        super().__init__(message)
        self.flow = flow


class Flow:
    """One thread of execution: its generator, the locks it holds and the wait before its next
    stretch. ``next(flow)`` runs one stretch and returns the race point it stopped at;
    ``StopIteration.value`` (and ``result``) is the flow's result when it ends."""

    __slots__ = ("name", "gen", "point", "done", "result", "error", "wait", "held", "vcpu",
                 "stepping", "closing", "__weakref__")

    def __init__(self, name: str, gen=None, vcpu=None):
        self.name = name
        self.gen = gen
        #: The vCPU this thread runs (kvm_get_running_vcpu), or None.
        self.vcpu = vcpu
        #: The race point the flow is paused at (None before its first step).
        self.point: str | None = None
        self.done = False
        self.result = None
        self.error: BaseException | None = None
        #: What the next stretch needs (a ``Wait``), or None.
        self.wait: Wait | None = None
        #: (lock, mode) pairs in the order taken.
        self.held: list = []
        #: Driven one stretch at a time (next()), not run to its end (see ``stepping()``).
        self.stepping = False
        #: Being closed (``close``): its ``finally`` blocks run as the thread is killed.
        self.closing = False

    def __repr__(self) -> str:
        state = "done" if self.done else (self.point or "new")
        return f"<Flow {self.name} {state}>"

    # ------------------------------------------------------------------ what a scheduler asks

    @property
    def runnable(self) -> bool:
        """Not done, and whatever its next stretch waits for is free."""
        return not self.done and (self.wait is None or self.wait.ready(self))

    @property
    def waits_for(self) -> str | None:
        """The wait before the next stretch, as text (``"mmu_lock(write)"``), or None."""
        return None if self.wait is None else self.wait.describe()

    @property
    def holds(self) -> list[str]:
        """What the flow holds now, as text, in the order taken (``["srcu", "mmu_lock(read)"]``)."""
        return [f"{lock.name}({mode})" if isinstance(lock, RwLock) and not lock.exclusive
                else lock.name for lock, mode in self.held]

    # ------------------------------------------------------------------ driving

    def __iter__(self):
        return self

    def __next__(self) -> str:
        """Run the next stretch; return the race point it stopped at."""
        if self.done:
            raise StopIteration(self.result)
        return self._drive(True)

    def run(self):
        """Drive the flow to its end and return its result (the plain call)."""
        if self.done:
            return self.result
        return self._drive(False)

    def _drive(self, once: bool):
        """Run stretches (one, or until the end) as the current thread: the point the stretch
        stopped at (``once``), else the flow's result; a flow that ends under ``once`` raises
        StopIteration with it. A wait that cannot be met raises WouldBlock before the stretch
        and leaves the flow paused; anything the generator raises ends the flow."""
        global _current
        send = self.gen.send
        self.stepping = once
        prev, _current = _current, self
        try:
            while True:
                wait = self.wait
                if wait is not None and not wait.ready(self):
                    raise WouldBlock(f"{self.name} at {self.point}: needs {wait.describe()}, "
                                     f"held by {wait.holder_names(self)}", self)
                try:
                    point = send(None)
                except StopIteration as stop:
                    self.done, self.result, self.point = True, stop.value, None
                    if once:
                        raise
                    return stop.value
                except BaseException as exc:
                    self.done, self.error, self.point = True, exc, None
                    raise
                self.point = point
                if once:
                    return point
        finally:
            _current = prev

    def close(self) -> None:
        """Abandon a paused flow: its ``finally`` blocks release what it holds, as if the
        thread were killed there; whatever else it changed stays."""
        if self.done or self.gen is None:
            self.done = True
            return
        global _current
        prev, _current = _current, self
        self.closing = True
        try:
            self.gen.close()
        finally:
            _current = prev
            self.done = True
            self.wait = None

    def __del__(self):
        # A flow dropped while paused is closed as its own thread, so that what it holds is
        # released by its holder.
        if not self.done and self.gen is not None:
            try:
                self.close()
            except Exception:  # noqa: BLE001 - nothing can be raised from a finalizer
                pass


#: The flow whose stretch is running. Outside any flow (a plain call at the top level), a
#: default flow stands for the caller's thread.
_current = Flow("main")


def current() -> Flow:
    return _current


def stepping() -> bool:
    """Whether the running flow stops at its race points (driven by ``next()``, as a test or
    the explorer does) rather than running to its end (a plain call, ``Flow.run``, a nested
    ``drive``). A hot path may pass a point that waits for nothing without yielding when this
    is False: no other flow can run there then, so the point could not be observed."""
    return _current.stepping


def run(gen, name: str = "call"):
    """A plain call: drive the flow ``gen`` to its end in a flow of its own."""
    return Flow(name, gen).run()


def drive(gen):
    """Run the generator ``gen`` to its end inside the current flow's stretch, without
    pausing at its race points: for a nested flow Linux runs in the same thread where the
    model cannot yield (a COW break inside get_user_pages, reached through a hook). Raises
    WouldBlock where it would have to wait for a paused flow."""
    flow = _current
    try:
        while True:
            gen.send(None)
            wait = flow.wait
            if wait is not None and not wait.ready(flow):
                gen.close()
                raise WouldBlock(f"{flow.name}: a nested flow needs {wait.describe()}, held "
                                 f"by {wait.holder_names(flow)}")
    except StopIteration as stop:
        return stop.value


# --------------------------------------------------------------------------- waits


def with_attribute(gen, obj, name: str, value):
    """Run the flow ``gen`` with ``obj.name`` set to ``value`` while it runs, not while it is
    paused at a race point, where other flows run and must see the real one: how a test or
    a mutant changes one thing one flow does (a flush it does not make). Returns what the
    flow returns; closing or throwing into it reaches ``gen``."""
    sent, thrown = None, None
    while True:
        setattr(obj, name, value)
        try:
            point = gen.send(sent) if thrown is None else gen.throw(thrown)
        except StopIteration as done:
            return done.value
        finally:
            delattr(obj, name)
        sent, thrown = None, None
        try:
            sent = yield point
        except GeneratorExit:
            gen.close()
            raise
        except BaseException as e:  # noqa: BLE001 - handed to the flow, as yield from does
            thrown = e


class Wait:
    """What a paused flow needs before its next stretch."""

    __slots__ = ()

    def ready(self, flow: Flow) -> bool:
        raise NotImplementedError

    def describe(self) -> str:
        raise NotImplementedError

    def holder_names(self, flow: Flow) -> str:
        return "another flow"


class LockWait(Wait):
    __slots__ = ("lock", "mode")

    def __init__(self, lock, mode):
        self.lock = lock
        self.mode = mode

    def ready(self, flow: Flow) -> bool:
        return self.lock.available(self.mode, flow)

    def describe(self) -> str:
        lock = self.lock
        return lock.name if lock.exclusive else f"{lock.name}({self.mode})"

    def holder_names(self, flow: Flow) -> str:
        return ", ".join(f.name for f in self.lock.holders() if f is not flow) or "nobody"


class Until(Wait):
    """A condition another flow makes true (``mn_active_invalidate_count == 0``)."""

    __slots__ = ("test", "text")

    def __init__(self, test, text: str):
        self.test = test
        self.text = text

    def ready(self, flow: Flow) -> bool:
        return self.test()

    def describe(self) -> str:
        return self.text


# --------------------------------------------------------------------------- locks


class RwLock:
    """An rwlock (kvm->mmu_lock with KVM_HAVE_MMU_RWLOCK: x86, arm64): readers share it, a
    writer excludes everyone. With ``exclusive=True`` it is a spinlock (ppc's mmu_lock):
    ``read_lock`` takes it exclusively too. Not recursive: taking it twice is a flow bug."""

    __slots__ = ("name", "exclusive", "_writer", "_readers", "_waits")

    # Holders are kept as weak references: a VM (and its locks) is in reference cycles, and a
    # paused flow must not be, so that a dropped flow is finalised as its own thread.

    def __init__(self, name: str = "mmu_lock", exclusive: bool = False):
        self.name = name
        self.exclusive = exclusive
        self._writer = None
        self._readers: list = []
        #: One wait record per mode, shared by every flow that waits for this lock.
        self._waits = {READ: LockWait(self, READ), WRITE: LockWait(self, WRITE)}

    def __repr__(self) -> str:
        return f"<{self.name} writer={self.writer} readers={self.readers}>"

    @property
    def writer(self) -> Flow | None:
        return None if self._writer is None else self._writer()

    @property
    def readers(self) -> list[Flow]:
        return [r() for r in self._readers]

    def holders(self) -> list[Flow]:
        return [self.writer] if self._writer is not None else self.readers

    def available(self, mode: str, flow: Flow) -> bool:
        if self._writer is not None:
            return False
        return not self._readers if (mode == WRITE or self.exclusive) else True

    # Yielding acquisition: the race point comes first, the lock is taken when resumed.

    def read_lock(self, point: str):
        yield from _wait(self, READ, point)
        self._take(READ)

    def write_lock(self, point: str):
        yield from _wait(self, WRITE, point)
        self._take(WRITE)

    def read_unlock(self) -> None:
        self._drop(READ)

    def write_unlock(self) -> None:
        self._drop(WRITE)

    def try_lock(self, mode: str) -> bool:
        """Take the lock now if it is free (True), without the race point before it: for a
        hot path whose flow is not stepped (``stepping()`` False), where no other flow could
        run at that point. False: the caller waits at its point (``read_lock`` /
        ``write_lock``), so a plain call still stops there, paused, when a paused flow
        holds the lock."""
        if self._writer is not None or (self._readers and (mode == WRITE or self.exclusive)):
            return False
        self._take(mode)
        return True

    def take(self, mode: str, point: str):
        """Take the lock in ``mode``: at once when it is free, else waiting at ``point`` (a
        flow that starts with it, or whose point just before waited for it already)."""
        if not self.try_lock(mode):
            yield from _wait(self, mode, point)
            self._take(mode)

    def wait_free(self, point: str, mode: str = WRITE):
        """Yield at ``point`` until the lock could be taken in ``mode``, without taking it:
        the stretch after the point calls code that takes it itself (a hook)."""
        yield from _wait(self, mode, point)

    def downgrade(self) -> None:
        """mmap_write_downgrade / downgrade_write: the write hold becomes a read hold, with no
        writer able to get in between."""
        self._drop(WRITE)
        self._take(READ)

    def cond_resched(self, mode: str, point: str):
        """cond_resched_rwlock_write/_read: drop the lock, let others run, take it again."""
        self._drop(mode)
        yield from _wait(self, mode, point)
        self._take(mode)

    # Immediate acquisition, for stretches that take and drop the lock without a race point
    # between: fails (WouldBlock) rather than sleep when a paused flow holds it.

    def __call__(self, mode: str = WRITE) -> _Guard:
        return _Guard(self, mode)

    def acquire(self) -> None:
        """KVM_MMU_LOCK in generic code: the lock for write, now."""
        self._take(WRITE)

    def release(self) -> None:
        self._drop(WRITE)

    def __enter__(self):
        self._take(WRITE)
        return self

    def __exit__(self, *exc) -> bool:
        self._drop(WRITE)
        return False

    def _take(self, mode: str) -> None:
        # available(), inline: every lock taken on the fault path comes here.
        flow = _current
        ref = weakref.ref(flow)
        writer, readers = self._writer, self._readers
        if writer == ref or ref in readers:
            raise RuntimeError(f"{self.name} taken by {flow.name} while it holds it")
        if writer is not None or (readers and (mode == WRITE or self.exclusive)):
            raise WouldBlock(f"{flow.name}: needs {self.name}({mode}), held by "
                             f"{', '.join(f.name for f in self.holders() if f)}")
        if mode == READ and not self.exclusive:
            readers.append(ref)
        else:
            self._writer = ref
        flow.held.append((self, mode))

    def _drop(self, mode: str) -> None:
        flow = _current
        ref = weakref.ref(flow)
        if mode == READ and not self.exclusive:
            if ref in self._readers:
                self._readers.remove(ref)
            elif not _drop_dead(self._readers) and not _killed_without(flow, self, mode):
                raise RuntimeError(f"{self.name} read-unlocked by {flow.name}, not a reader")
        elif self._writer == ref or (self._writer is not None and self._writer() is None):
            self._writer = None
        elif not _killed_without(flow, self, mode):
            raise RuntimeError(f"{self.name} unlocked by {flow.name}, not its holder")
        try:
            flow.held.remove((self, mode))
        except ValueError:
            pass                # a dead flow's hold (_drop_dead), or one taken by another

    @property
    def held(self) -> bool:
        return self._writer is not None or bool(self._readers)


def _killed_without(flow: Flow, lock, mode: str) -> bool:
    """``flow`` is being closed and does not hold ``lock`` in ``mode``: killed inside
    ``cond_resched``, where it had dropped it, its callers' ``finally`` blocks release what
    it no longer holds, which changes nothing."""
    return flow.closing and (lock, mode) not in flow.held


def _drop_dead(refs: list) -> bool:
    """Release one hold of a flow that no longer exists (its generator being finalised after
    it): True if there was one."""
    for r in refs:
        if r() is None:
            refs.remove(r)
            return True
    return False


class Mutex(RwLock):
    """A sleeping lock held by one flow (slots_lock, slots_arch_lock, a file's
    invalidate_lock taken exclusively)."""

    __slots__ = ()

    def __init__(self, name: str):
        super().__init__(name, exclusive=True)

    def lock(self, point: str):
        yield from _wait(self, WRITE, point)
        self._take(WRITE)

    def unlock(self) -> None:
        self._drop(WRITE)


class _Guard:
    __slots__ = ("lock", "mode")

    def __init__(self, lock: RwLock, mode: str):
        self.lock = lock
        self.mode = mode

    def __enter__(self):
        self.lock._take(self.mode)
        return self.lock

    def __exit__(self, *exc) -> bool:
        self.lock._drop(self.mode)
        return False


def _wait(lock, mode, point: str):
    # No reference to the flow is kept in the frame: a flow and its generator must not form
    # a cycle, so that a dropped flow is closed by Flow.__del__, as its own thread.
    _current.wait = lock._waits[mode]
    try:
        yield point
    finally:
        _current.wait = None


def wait_until(test, text: str, point: str):
    """Yield at ``point`` until ``test()`` is true (``text`` says what is awaited)."""
    _current.wait = Until(test, text)
    try:
        yield point
    finally:
        _current.wait = None


class Srcu:
    """kvm->srcu: readers never block; ``synchronize`` waits for the read sides that began
    before it (synchronize_srcu_expedited), not for later ones."""

    __slots__ = ("name", "readers", "_idx")

    def __init__(self, name: str = "srcu"):
        self.name = name
        #: read-side token -> weak reference to its flow
        self.readers: dict = {}
        self._idx = count()

    def read_lock(self) -> int:
        """srcu_read_lock: returns the token to pass to ``read_unlock``."""
        flow = _current
        idx = next(self._idx)
        self.readers[idx] = weakref.ref(flow)
        flow.held.append((self, idx))
        return idx

    def read_unlock(self, idx: int) -> None:
        flow = self.readers.pop(idx)()
        if flow is not None and (self, idx) in flow.held:
            flow.held.remove((self, idx))

    def synchronize(self, point: str):
        """Yield at ``point`` until every read side that started before now has ended."""
        earlier = tuple(i for i, f in self.readers.items() if f() is not _current)
        readers = self.readers
        _current.wait = Until(lambda: not any(i in readers for i in earlier),
                              f"{self.name} grace period")
        try:
            yield point
        finally:
            _current.wait = None


# --------------------------------------------------------------------------- starting flows


class steppable:
    """A flow written once, as a generator method. Calling the method runs the flow to its end
    in a flow of its own (the plain call, ``vm.set_memory_attributes(...)``);
    ``obj.steps.NAME(...)`` starts the same generator as a ``Flow`` to step. The object names
    its flows with ``flow_label`` (``"vm"``, ``"vcpu1"``, ``"host"``)."""

    def __init__(self, fn):
        self.fn = fn
        self.name = fn.__name__
        self.__doc__ = fn.__doc__
        self.__wrapped__ = fn

    def __set_name__(self, owner, name: str) -> None:
        self.name = name

    def __get__(self, obj, owner=None):
        if obj is None:
            return self
        fn = self.fn
        name = self.name

        def call(*args, **kwargs):
            return Flow(f"{obj.flow_label}.{name}", fn(obj, *args, **kwargs),
                        getattr(obj, "flow_vcpu", None)).run()

        call.__name__ = name
        call.__doc__ = fn.__doc__
        #: The generator itself, for a flow that runs this one inside its own.
        call.flow = lambda *args, **kwargs: fn(obj, *args, **kwargs)
        return call


class Steps:
    """``obj.steps``: every flow of ``obj`` started as a ``Flow`` instead of run to its end:
    the methods marked ``steppable``, and the generator methods a class lists in
    ``step_methods`` (name -> generator function, for methods kept plain because they are
    hot)."""

    __slots__ = ("_obj",)

    def __init__(self, obj):
        self._obj = obj

    def _generator_of(self, name: str):
        cls = type(self._obj)
        attr = getattr(cls, name, None)
        if isinstance(attr, steppable):
            return attr.fn
        return getattr(cls, "step_methods", {}).get(name)

    def __getattr__(self, name: str):
        fn = self._generator_of(name)
        if fn is None:
            raise AttributeError(f"{type(self._obj).__name__}.{name} is not a steppable flow; "
                                 f"those are: {', '.join(dir(self))}")
        obj = self._obj

        def start(*args, **kwargs) -> Flow:
            return Flow(f"{obj.flow_label}.{name}", fn(obj, *args, **kwargs),
                        getattr(obj, "flow_vcpu", None))

        start.__name__ = name
        start.__doc__ = fn.__doc__
        return start

    def __dir__(self):
        cls = type(self._obj)
        names = {n for n in dir(cls) if isinstance(getattr(cls, n, None), steppable)}
        return sorted(names | set(getattr(cls, "step_methods", {})))
