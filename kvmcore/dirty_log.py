"""Dirty-log storage: a memslot's dirty bitmap and a vCPU's dirty ring (struct kvm_dirty_ring,
virt/kvm/dirty_ring.c). State only: the flows that fill and harvest them are in ``dirty``."""

from __future__ import annotations

from array import array

from .uapi import KVM_DIRTY_GFN_F_DIRTY, KVM_DIRTY_GFN_F_RESET, KVM_DIRTY_GFN_SIZE, \
    KVM_DIRTY_RING_RSVD_ENTRIES

U64_MASK = (1 << 64) - 1


class DirtyBitmap:
    """A slot's dirty bitmap: 64-bit little-endian words, plus the set of words that may be
    non-zero so that GET costs what is dirty, not the slot size. (Linux allocates twice the
    size and uses the second half as scratch for the snapshot; the model returns the
    snapshot as a list instead.)"""

    __slots__ = ("npages", "words", "nonzero")

    def __init__(self, npages: int, initially_set: bool = False):
        self.npages = npages
        nwords = (npages + 63) >> 6
        self.words = array("Q", bytes(8 * nwords))
        self.nonzero: set[int] = set()
        if initially_set:
            for i in range(nwords):
                self.words[i] = U64_MASK
            if npages & 63:
                self.words[nwords - 1] = (1 << (npages & 63)) - 1
            self.nonzero = set(range(nwords))

    def set(self, rel: int) -> None:
        i = rel >> 6
        self.words[i] |= 1 << (rel & 63)
        self.nonzero.add(i)

    def test(self, rel: int) -> bool:
        return bool(self.words[rel >> 6] >> (rel & 63) & 1)

    def xchg(self, i: int) -> int:
        word = self.words[i]
        self.words[i] = 0
        self.nonzero.discard(i)
        return word

    def fetch_andnot(self, i: int, mask: int) -> int:
        old = self.words[i]
        new = old & ~mask & U64_MASK
        self.words[i] = new
        if not new:
            self.nonzero.discard(i)
        return old

    def pages(self) -> list[int]:
        out = []
        words = self.words
        for i in sorted(self.nonzero):
            word = words[i]
            base = i << 6
            while word:
                low = word & -word
                out.append(base + low.bit_length() - 1)
                word ^= low
        return out


class DirtyRing:
    """struct kvm_dirty_ring: ``size`` entries of (flags, slot, offset); the free-running u32
    indices ``dirty_index`` (KVM's producer) and ``reset_index`` (KVM's consumer), and
    ``fetch_index``, where userspace harvests next."""

    def __init__(self, size_bytes: int, cpu_dirty_log_size: int):
        self.size = size_bytes // KVM_DIRTY_GFN_SIZE
        self.soft_limit = self.size - (KVM_DIRTY_RING_RSVD_ENTRIES + cpu_dirty_log_size)
        self.flags = array("I", bytes(4 * self.size))
        self.slots = array("I", bytes(4 * self.size))
        self.offsets = array("Q", bytes(8 * self.size))
        self.dirty_index = 0
        self.reset_index = 0
        self.fetch_index = 0
        self.soft_full_request = False

    @property
    def used(self) -> int:
        return (self.dirty_index - self.reset_index) & 0xFFFFFFFF

    def soft_full(self) -> bool:
        return self.used >= self.soft_limit

    def push(self, slot_id: int, offset: int) -> None:
        """kvm_dirty_ring_push."""
        if self.used >= self.size:
            raise RuntimeError("dirty ring overflow: KVM would WARN and lose the entry")
        i = self.dirty_index & (self.size - 1)
        self.slots[i] = slot_id
        self.offsets[i] = offset
        self.flags[i] = KVM_DIRTY_GFN_F_DIRTY
        self.dirty_index = (self.dirty_index + 1) & 0xFFFFFFFF
        if self.soft_full():
            self.soft_full_request = True

    def harvest(self) -> list[tuple[int, int]]:
        """What userspace does: collect DIRTY entries in order and mark them RESET."""
        out = []
        while True:
            i = self.fetch_index & (self.size - 1)
            if not self.flags[i] & KVM_DIRTY_GFN_F_DIRTY or self.flags[i] & KVM_DIRTY_GFN_F_RESET:
                break
            out.append((self.slots[i], self.offsets[i]))
            self.flags[i] |= KVM_DIRTY_GFN_F_RESET
            self.fetch_index = (self.fetch_index + 1) & 0xFFFFFFFF
        return out

    def pending(self) -> set[tuple[int, int]]:
        """Entries pushed and not yet reset: (slot_id, offset)."""
        out = set()
        idx = self.reset_index
        while idx != self.dirty_index:
            i = idx & (self.size - 1)
            out.add((self.slots[i], self.offsets[i]))
            idx = (idx + 1) & 0xFFFFFFFF
        return out
