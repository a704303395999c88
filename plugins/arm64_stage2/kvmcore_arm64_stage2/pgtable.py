"""Stage-2 descriptors, walkers and break-before-make, after ``arch/arm64/kvm/hyp/pgtable.c``
and ``arch/arm64/include/asm/kvm_pgtable.h`` (shared/reference/arm64_stage2.md §1, §4, §5, §6,
§8). The descriptor is a ``kvmcore.radix.RadixFormat`` (``Stage2Format``) and the tree a
``RadixTable``: the walker (``PageTable.walk_steps``), the leaf iteration, write-protect, aging
and the format invariants are the core's; the visitors, break-before-make, TLBIs, cache
maintenance and page counts are arm64's.

Layout choice: the 6.17/6.18 descriptor layout (the trees whose ``mmu.c`` the abort path
follows), i.e. **XN is the single bit 54** and the prot flags are X=bit0, W=bit1, R=bit2,
DEVICE=bit3, NORMAL_NC=bit4, SW0..SW3=bits 55..58 (linux-next's FEAT_XNX two-bit XN [54:53]
and PX/UX are not modelled). With one XN bit ``relax_perms`` only ever *clears* XN, so it can
never remove execute permission.

Model simplifications (each stated where it matters):

* Shared walks (KVM_PGTABLE_WALK_SHARED, under the read MMU lock: the fault path's map and
  relax_perms) are generators (``map_steps``, ``relax_perms_steps``) that yield a race point
  where Linux lets another walker in between its read of an entry and its cmpxchg:
  ``arm64_pte_break`` (the old entry read, before the cmpxchg to LOCKED),
  ``arm64_pte_make`` (the entry LOCKED and its TLB invalidated, before the new entry is
  stored), ``arm64_relax_cmpxchg`` (relax_perms' old entry read, before its cmpxchg). A
  stretch between two points runs alone, so Linux's cmpxchg (``stage2_try_set_pte``) is a
  compare with the value the visitor read followed by a store; another walker that meets a
  LOCKED entry gets -EAGAIN, never overwrites it. Exclusive walks (write lock) yield nothing.
* Tables a shared walker unlinks (a table replaced by a block) are freed once no shared walk
  is in progress (Linux frees them through RCU, after the walkers' rcu_read_lock sections);
  exclusive walks free at once.
* The memory cache (``kvm_mmu_memory_cache``) never runs dry, so ``-ENOMEM`` never happens
  and eager split always builds fully populated subtrees (``force_pte``).
* Cache maintenance is recorded as an event, not performed (there are no caches); with FWB
  the D-cache clean is skipped, with CTR_EL0.DIC the I-cache invalidation is skipped, as
  ``clean_dcache_guest_page`` / ``invalidate_icache_guest_page`` do.
"""

from __future__ import annotations

import collections
import enum
import errno
import functools
from types import GeneratorType

import attrs
import structlog
from kvmcore.pgtable import LEAF, TABLE_POST, TABLE_PRE, TableStore
from kvmcore.radix import PERM_A, PERM_R, PERM_W, PERM_X, RadixFormat, RadixTable
from kvmcore.records import record

from .geometry import KVM_PGTABLE_LAST_LEVEL, Stage2Geometry

logger = structlog.get_logger(__name__)


def GENMASK(hi: int, lo: int) -> int:  # noqa: N802 - Linux's name
    return ((1 << (hi - lo + 1)) - 1) << lo


# ---------------------------------------------------------------- descriptor bits (§1)

KVM_PTE_VALID = 1 << 0
KVM_PTE_TYPE = 1 << 1
KVM_PTE_TYPE_BLOCK = 0
KVM_PTE_TYPE_PAGE = 1
KVM_PTE_TYPE_TABLE = 1

#: Output address [47:PAGE_SHIFT] (no LPA2, PA <= 48 bits): see kvm_pte_addr_mask().
KVM_PTE_ADDR_HI = 47

KVM_PTE_LEAF_ATTR_LO = GENMASK(11, 2)
KVM_PTE_LEAF_ATTR_LO_S2_MEMATTR = GENMASK(5, 2)
KVM_PTE_LEAF_ATTR_LO_S2_S2AP_R = 1 << 6
KVM_PTE_LEAF_ATTR_LO_S2_S2AP_W = 1 << 7
KVM_PTE_LEAF_ATTR_LO_S2_SH = GENMASK(9, 8)
KVM_PTE_LEAF_ATTR_LO_S2_SH_IS = 3
KVM_PTE_LEAF_ATTR_LO_S2_AF = 1 << 10

#: Upper attributes [63:51] in the 6.17 layout.
KVM_PTE_LEAF_ATTR_HI = GENMASK(63, 51)
KVM_PTE_LEAF_ATTR_HI_SW = GENMASK(58, 55)
KVM_PTE_LEAF_ATTR_HI_S2_XN = 1 << 54
#: Never set by KVM stage-2 (Contiguous, DBM).
KVM_PTE_CONT = 1 << 52
KVM_PTE_DBM = 1 << 51

KVM_PTE_LEAF_ATTR_S2_PERMS = (KVM_PTE_LEAF_ATTR_LO_S2_S2AP_R | KVM_PTE_LEAF_ATTR_LO_S2_S2AP_W
                              | KVM_PTE_LEAF_ATTR_HI_S2_XN)

#: An invalid entry with bit 10 set: a break-before-make is in progress.
KVM_INVALID_PTE_LOCKED = 1 << 10

# MemAttr encodings (asm/memory.h MT_S2_* / MT_S2_FWB_*).
MT_S2_NORMAL = 0xF
MT_S2_NORMAL_NC = 0x5
MT_S2_DEVICE_nGnRE = 0x1  # noqa: N816 - Linux's name
MT_S2_FWB_NORMAL = 0x6
MT_S2_FWB_NORMAL_NC = 0x5
MT_S2_FWB_DEVICE_nGnRE = 0x1  # noqa: N816


class KvmPgtableProt(enum.IntFlag):
    """enum kvm_pgtable_prot, 6.17 numbering (the model uses the flags by name)."""

    X = 1 << 0
    W = 1 << 1
    R = 1 << 2
    DEVICE = 1 << 3
    NORMAL_NC = 1 << 4
    SW0 = 1 << 55
    SW1 = 1 << 56
    SW2 = 1 << 57
    SW3 = 1 << 58


# Plain-int aliases for the hot path (IntFlag arithmetic is slow); they compare equal to the
# KvmPgtableProt members.
PROT_R = int(KvmPgtableProt.R)
PROT_W = int(KvmPgtableProt.W)
PROT_X = int(KvmPgtableProt.X)
PROT_RW = PROT_R | PROT_W
PROT_RWX = PROT_RW | PROT_X
PROT_DEVICE = int(KvmPgtableProt.DEVICE)
PROT_NORMAL_NC = int(KvmPgtableProt.NORMAL_NC)
PROT_SW = KVM_PTE_LEAF_ATTR_HI_SW

# Walk flags (enum kvm_pgtable_walk_flags). LEAF/TABLE_PRE/TABLE_POST are the core walker's.
KVM_PGTABLE_WALK_SHARED = 1 << 3
KVM_PGTABLE_WALK_HANDLE_FAULT = 1 << 4
KVM_PGTABLE_WALK_SKIP_BBM_TLBI = 1 << 5
KVM_PGTABLE_WALK_SKIP_CMO = 1 << 6
#: The flags user_mem_abort / gmem_abort / handle_access_fault pass ([6.17]).
FAULT_WALK_FLAGS = KVM_PGTABLE_WALK_HANDLE_FAULT | KVM_PGTABLE_WALK_SHARED

#: The TLBI of a valid block that a map walk replaces by an empty table
#: (stage2_map_walk_leaf): the rest of the block is unmapped, to be faulted in lazily.
BBM_BLOCK_TO_TABLE = "bbm_block_to_table"
#: The TLBI of a table that a map walk replaces by a block (stage2_map_walk_table_pre, e.g.
#: a fault of a slot that stopped logging): nothing maps the table's range until the make.
BBM_TABLE = "bbm_table"
#: Race points of the shared walks (reference/races.md §1.B): the old entry read, before the
#: cmpxchg to LOCKED (stage2_try_break_pte); the entry LOCKED, before the new one is stored
#: (stage2_make_pte); relax_perms' old entry read, before its cmpxchg (stage2_attr_walker).
ARM64_PTE_BREAK = "arm64_pte_break"
ARM64_PTE_MAKE = "arm64_pte_make"
ARM64_RELAX_CMPXCHG = "arm64_relax_cmpxchg"

#: Where page-table pages live in the modelled PA space: below 2^48 so that the 48-bit output
#: address field can carry them, far above the host's data frames.
TABLE_PA_BASE = 1 << 47

#: Level hint of a TLBI whose level is unknown (TLBI_TTL_UNKNOWN).
TLBI_TTL_UNKNOWN = None


_MEMATTR = {
    (True, "normal"): MT_S2_FWB_NORMAL, (True, "normal_nc"): MT_S2_FWB_NORMAL_NC,
    (True, "device"): MT_S2_FWB_DEVICE_nGnRE,
    (False, "normal"): MT_S2_NORMAL, (False, "normal_nc"): MT_S2_NORMAL_NC,
    (False, "device"): MT_S2_DEVICE_nGnRE,
}


def memattr_value(kind: str, fwb: bool) -> int:
    """KVM_S2_MEMATTR(pgt, kind): the 4-bit MemAttr field."""
    return _MEMATTR[bool(fwb), kind]


def PAGE_S2_MEMATTR(kind: str, fwb: bool) -> int:  # noqa: N802
    return memattr_value(kind, fwb) << 2


def kvm_pte_valid(pte: int) -> bool:
    return bool(pte & KVM_PTE_VALID)


#: kvm_pte_table: a valid entry of TYPE table (below the last level).
_TABLE_BITS = KVM_PTE_VALID | KVM_PTE_TYPE


def kvm_pte_table(pte: int, level: int) -> bool:
    if level == KVM_PGTABLE_LAST_LEVEL or not kvm_pte_valid(pte):
        return False
    return (pte & KVM_PTE_TYPE) >> 1 == KVM_PTE_TYPE_TABLE


#: stage2_pte_is_locked as one test: not VALID, LOCKED set.
_LOCKED_BITS = KVM_PTE_VALID | KVM_INVALID_PTE_LOCKED


def stage2_pte_is_locked(pte: int) -> bool:
    return pte & _LOCKED_BITS == KVM_INVALID_PTE_LOCKED


def stage2_pte_is_counted(pte: int) -> bool:
    """Valid entries and owner annotations hold a reference on their table page."""
    return pte != 0


def stage2_pte_executable(pte: int) -> bool:
    return kvm_pte_valid(pte) and not pte & KVM_PTE_LEAF_ATTR_HI_S2_XN


def pte_memattr(pte: int) -> int:
    return (pte & KVM_PTE_LEAF_ATTR_LO_S2_MEMATTR) >> 2


def kvm_pgtable_stage2_pte_prot(pte: int) -> KvmPgtableProt:
    """kvm_pgtable_stage2_pte_prot: R/W/X from the leaf, and its SW bits even when invalid.
    MemAttr is *not* returned (so a split rebuilds a device block as Normal)."""
    prot = KvmPgtableProt(pte & KVM_PTE_LEAF_ATTR_HI_SW)
    if not kvm_pte_valid(pte):
        return prot
    if pte & KVM_PTE_LEAF_ATTR_LO_S2_S2AP_R:
        prot |= PROT_R
    if pte & KVM_PTE_LEAF_ATTR_LO_S2_S2AP_W:
        prot |= PROT_W
    if not pte & KVM_PTE_LEAF_ATTR_HI_S2_XN:
        prot |= PROT_X
    return prot


@functools.cache
def stage2_set_prot_attr(prot: int, fwb: bool) -> tuple[int, int]:
    """stage2_set_prot_attr: (0, attr) or (-EINVAL, 0) for DEVICE+NC, DEVICE+X, NC+X (kept
    per prot: every fault asks)."""
    dev, nc = prot & PROT_DEVICE, prot & PROT_NORMAL_NC
    if dev and nc:
        return -errno.EINVAL, 0
    if dev:
        if prot & PROT_X:
            return -errno.EINVAL, 0
        attr = PAGE_S2_MEMATTR("device", fwb)
    elif nc:
        if prot & PROT_X:
            return -errno.EINVAL, 0
        attr = PAGE_S2_MEMATTR("normal_nc", fwb)
    else:
        attr = PAGE_S2_MEMATTR("normal", fwb)
    if not prot & PROT_X:
        attr |= KVM_PTE_LEAF_ATTR_HI_S2_XN
    if prot & PROT_R:
        attr |= KVM_PTE_LEAF_ATTR_LO_S2_S2AP_R
    if prot & PROT_W:
        attr |= KVM_PTE_LEAF_ATTR_LO_S2_S2AP_W
    attr |= KVM_PTE_LEAF_ATTR_LO_S2_SH_IS << 8
    attr |= KVM_PTE_LEAF_ATTR_LO_S2_AF
    attr |= int(prot) & KVM_PTE_LEAF_ATTR_HI_SW
    return 0, attr


class Stage2Format(RadixFormat):
    """The stage-2 descriptor of one geometry (§1): VALID, TYPE (table, or a page at level 3
    and a block above), the output address for the granule, S2AP R/W, XN, AF as the accessed
    bit and no dirty bit (DBM is never set: a writable leaf counts as dirty); leaves at the
    levels that allow blocks (kvm_level_supports_block_mapping) and at level 3."""

    R, W = KVM_PTE_LEAF_ATTR_LO_S2_S2AP_R, KVM_PTE_LEAF_ATTR_LO_S2_S2AP_W
    XN, A = KVM_PTE_LEAF_ATTR_HI_S2_XN, KVM_PTE_LEAF_ATTR_LO_S2_AF

    def __init__(self, geom: Stage2Geometry, fwb: bool = True):
        self.geometry = geom.core_geometry()
        self.leaf_levels = frozenset(lvl for lvl in self.geometry.level_ids
                                     if geom.level_supports_block(lvl))
        self.page_shift = geom.page_shift
        self.addr_mask = GENMASK(KVM_PTE_ADDR_HI, geom.page_shift)
        #: kvm_pte_table above the last level, and the next table's address (for lookup).
        self.table_bits = (_TABLE_BITS, _TABLE_BITS, self.addr_mask)
        self.fwb = fwb

    def is_valid(self, pte: int, level: int) -> bool:
        return pte & KVM_PTE_VALID == KVM_PTE_VALID

    def is_table(self, pte: int, level: int) -> bool:
        """kvm_pte_table, inline: the walks ask it of every entry."""
        return level != KVM_PGTABLE_LAST_LEVEL and pte & _TABLE_BITS == _TABLE_BITS

    def pte_to_phys(self, pte: int, level: int = 0) -> int:
        """kvm_pte_to_phys, and kvm_phys_to_pte: without LPA2 the address field holds the
        PA's own bits."""
        return pte & self.addr_mask

    phys_to_pte = table_address = output_address = pte_to_phys

    def make_table(self, pa: int, level: int = 0) -> int:
        """kvm_init_table_pte: address, TYPE=table, VALID; no attributes."""
        return self.phys_to_pte(pa) | KVM_PTE_TYPE_TABLE << 1 | KVM_PTE_VALID

    init_table_pte = make_table

    def init_valid_leaf_pte(self, pa: int, attr: int, level: int) -> int:
        """kvm_init_valid_leaf_pte: page TYPE at level 3, block below."""
        ty = KVM_PTE_TYPE_PAGE if level == KVM_PGTABLE_LAST_LEVEL else KVM_PTE_TYPE_BLOCK
        # kvm_phys_to_pte, inline: the PA's own bits.
        return (pa & self.addr_mask | (attr & (KVM_PTE_LEAF_ATTR_LO | KVM_PTE_LEAF_ATTR_HI))
                | ty << 1 | KVM_PTE_VALID)

    def make_leaf(self, pa: int, level: int, perms: int) -> int:
        """A Normal-memory leaf as stage2_set_prot_attr encodes ``perms``, AF only with
        PERM_A."""
        prot = ((PROT_R if perms & PERM_R else 0) | (PROT_W if perms & PERM_W else 0)
                | (PROT_X if perms & PERM_X else 0))
        attr = stage2_set_prot_attr(prot, self.fwb)[1]
        return self.init_valid_leaf_pte(pa, attr if perms & PERM_A else attr & ~self.A, level)

    def split_child(self, pte: int, level: int, child_level: int, index: int) -> int:
        """A child of a split block (kvm_pgtable_stage2_split): the block's R/W/X and SW
        bits, AF set, Normal memory (a device block is rebuilt as Normal)."""
        attr = stage2_set_prot_attr(kvm_pgtable_stage2_pte_prot(pte), self.fwb)[1]
        child = 1 << self.geometry.shifts[self.geometry.pos_of(child_level)]
        return self.init_valid_leaf_pte(self.pte_to_phys(pte) + index * child, attr,
                                        child_level)


# ---------------------------------------------------------------- records for tests


@record
class Tlbi:
    """One TLB invalidation KVM issued. ``op``: ``vmid_ipa`` (__kvm_tlb_flush_vmid_ipa, by IPA
    with a level hint, inner shareable), ``vmid_ipa_nsh`` (the local variant relax_perms
    uses), ``vmid_range`` (kvm_tlb_flush_vmid_range), ``vmid`` (__kvm_tlb_flush_vmid).
    ``level`` None is TLBI_TTL_UNKNOWN; ``size`` is what the model invalidates in the vCPU
    TLBs; ``why`` names the caller."""

    op: str
    ipa: int
    size: int
    level: int | None
    why: str


@record
class PteEvent:
    """One step of a page-table update, in order: ``break`` (entry := LOCKED), ``tlbi``,
    ``dcache_clean_inval_poc``, ``icache_inval_pou``, ``make`` (release-store of ``new``),
    ``set`` (in-place update without BBM: relax_perms, mkyoung, age, wrprotect), ``clear``
    (unmap)."""

    kind: str
    ipa: int
    level: int | None
    old: int = 0
    new: int = 0


class _EventLog(collections.deque):
    """``Stage2PageTable.events``: the steps kept as tuples of PteEvent's fields (a fault adds
    two, so they cost what a tuple costs) and read as ``PteEvent`` records."""

    def __iter__(self):
        return (PteEvent(*e) for e in super().__iter__())

    def __reversed__(self):
        return (PteEvent(*e) for e in super().__reversed__())

    def __getitem__(self, index):
        return PteEvent(*super().__getitem__(index))

    def __contains__(self, event) -> bool:
        return isinstance(event, PteEvent) and super().__contains__(attrs.astuple(event))

    def __copy__(self):
        return type(self)(super().__iter__(), self.maxlen)

    def __reduce__(self):
        return type(self), (list(super().__iter__()), self.maxlen)


class _MapData:
    """The map walker's data (stage2_map_data), one per walk: a plain slotted class (a fault
    builds one)."""

    __slots__ = ("phys", "attr", "force_pte", "steps", "locked")

    def __init__(self, phys: int, attr: int, force_pte: bool, steps: bool = False):
        self.phys = phys
        self.attr = attr
        self.force_pte = force_pte
        #: Yield the race points (a shared walk of a stepped flow).
        self.steps = steps
        #: (table, index) of a LOCKED entry the walk met (its -EAGAIN), or None.
        self.locked: tuple | None = None


class _AttrData:
    """stage2_attr_data, one per walk."""

    __slots__ = ("attr_set", "attr_clr", "level", "pte", "locked")

    def __init__(self, attr_set: int, attr_clr: int):
        self.attr_set = attr_set
        self.attr_clr = attr_clr
        self.level: int | None = None
        self.pte = 0
        self.locked: tuple | None = None


def run_plain(walk):
    """Run a walk generator whose visitors return plain results (a walk that is not stepped)
    to its end: it never yields, so one send ends it."""
    try:
        point = next(walk)
    except StopIteration as stop:
        return stop.value
    walk.close()
    raise AssertionError(f"a plain stage-2 walk stopped at {point!r}")


class _Stage2Store(TableStore):
    """Page-table pages and their page_count (1 + the counted entries, keyed by the page's
    PA), which comes and goes with the page."""

    def __init__(self, geom: Stage2Geometry):
        super().__init__(base=TABLE_PA_BASE, min_align=geom.granule)
        self.granule = geom.granule
        self.page_count: dict[int, int] = {}

    def alloc(self, nentries: int) -> int:
        pa = super().alloc(nentries)
        for page in range(pa, pa + nentries * 8, self.granule):
            self.page_count[page] = 1
        return pa

    def free(self, pa: int) -> None:
        self.page_count.pop(pa, None)
        super().free(pa)


def _not_eagain(ret: int) -> bool:
    return ret != -errno.EAGAIN


def _erange():
    """The walk of a range past the IPA space (kvm_pgtable_walk's -ERANGE)."""
    return -errno.ERANGE
    yield


class Stage2PageTable:
    """struct kvm_pgtable for one stage-2 (kvm_pgtable_stage2_init and its operations).

    ``on_tlbi`` is called for every TLB invalidation with its ``Tlbi`` record, after it is
    appended to ``tlbi_log``; the backend turns it into the core's vCPU-TLB flush. The logs
    keep the last ``log_size`` records (what a test reads after clearing them; a longer log
    would cost more model memory per mapped page than the page table itself).
    """

    def __init__(self, geom: Stage2Geometry, *, fwb: bool = True, cache_dic: bool = True,
                 tlbirange: bool = False, on_tlbi=None,
                 log_size: int = 1 << 12):
        self.geom = geom
        self.fwb = fwb
        self.cache_dic = cache_dic
        self.tlbirange = tlbirange
        self.fmt = Stage2Format(geom, fwb)
        self.store = _Stage2Store(geom)
        self.rt = RadixTable(self.fmt, self.store)
        self.rt.on_update = self._set_event
        self.pt = self.rt.pt
        self.page_count = self.store.page_count
        self.tlbi_log: collections.deque[Tlbi] = collections.deque(maxlen=log_size)
        self.events: collections.deque[PteEvent] = _EventLog(maxlen=log_size)
        self.on_tlbi = on_tlbi
        #: Entries a paused shared walker holds LOCKED between its break and its make:
        #: (table_pa, index) -> the entry it replaced.
        self.bbm_windows: dict[tuple[int, int], int] = {}
        #: Shared walks in progress (each an RCU read side), and the subtrees they unlinked
        #: (table, its level, its IPA), freed when the last one ends.
        self.shared_walkers = 0
        self.rcu_deferred: list[tuple[int, int, int]] = []
        self._normal_memattr = memattr_value("normal", fwb)
        #: What the map walker reads at every visit, bound once: the levels that allow
        #: blocks, and the mask giving an entry's table page (``_page_of``).
        self._leaf_levels = self.fmt.leaf_levels
        self._page_mask = ~(geom.granule - 1)
        self._granule = geom.granule
        self._phys_size = geom.phys_size
        #: _cmos does nothing (FWB: no D-cache clean; CTR_EL0.DIC: no I-cache invalidation).
        self._cmos_noop = fwb and cache_dic

    # ------------------------------------------------------------------ pages and TLBs

    @property
    def root(self) -> int:
        return self.pt.root

    def _page_of(self, table_pa: int, index: int) -> int:
        return table_pa + ((index * 8) & ~(self.geom.granule - 1))

    def _get_page(self, page: int) -> None:
        self.page_count[page] += 1

    def _put_page(self, page: int) -> None:
        self.page_count[page] -= 1
        if self.page_count[page] == 0:
            self.store.free(page)

    def _alloc_table(self) -> int:
        return self.store.alloc(self.geom.ptrs_per_pte)

    def _free_unlinked_shared(self, table_pa: int, level: int, ipa: int) -> None:
        """mm_ops->free_unlinked_table from a shared walk: after an RCU grace period, i.e. once
        no shared walk is in progress (another one may still be inside the subtree)."""
        self.rcu_deferred.append((table_pa, level, ipa))

    def _rcu_read_unlock(self) -> None:
        self.shared_walkers -= 1
        if not self.shared_walkers and self.rcu_deferred:
            deferred, self.rcu_deferred = self.rcu_deferred, []
            for table_pa, level, _ipa in deferred:
                self.free_unlinked(table_pa, level)

    def free_unlinked(self, table_pa: int, level: int) -> None:
        """kvm_pgtable_stage2_free_unlinked: free a detached subtree whatever its counts."""
        self.pt.free_subtree(table_pa, level - self.geom.start_level)

    def _tlbi(self, op: str, ipa: int, size: int, level: int | None, why: str) -> None:
        rec = Tlbi(op, ipa, size, level, why)
        self.tlbi_log.append(rec)
        self.events.append(("tlbi", ipa, level, 0, 0))
        if self.on_tlbi is not None:
            self.on_tlbi(rec)

    def tlb_flush_vmid_ipa(self, ipa: int, level: int | None, why: str, nsh=False) -> None:
        """__kvm_tlb_flush_vmid_ipa(_nsh): the whole leaf containing ``ipa`` (the level hint
        says which); with the level unknown, the base page at ``ipa``."""
        size = self.geom.size(level) if level is not None else self.geom.granule
        base = ipa & ~(size - 1)
        self._tlbi("vmid_ipa_nsh" if nsh else "vmid_ipa", base, size, level, why)

    def tlb_flush_vmid_range(self, ipa: int, size: int, why: str) -> None:
        """kvm_tlb_flush_vmid_range: range TLBIs with FEAT_TLBIRANGE, else the whole VMID."""
        if self.tlbirange:
            self._tlbi("vmid_range", ipa, size, None, why)
        else:
            self._tlbi("vmid", 0, self.geom.phys_size, None, why)

    # ------------------------------------------------------------------ walking

    def _walk_range(self, addr: int, size: int) -> tuple:
        """The walk's granule-aligned ``[start, end)``, or (None, None) past the IPA space
        (kvm_pgtable_walk's -ERANGE)."""
        g = self.geom.granule
        start = addr & ~(g - 1)
        end = (addr + size + g - 1) & ~(g - 1)
        limit = self.geom.phys_size
        if start > limit or end > limit:
            return None, None
        return start, end

    def walk(self, addr: int, size: int, visitor, flags: int, visit_invalid: bool = True):
        """kvm_pgtable_walk: page-align, bound-check (-ERANGE), visit; a visitor's -EAGAIN
        stops the walk only with HANDLE_FAULT (kvm_pgtable_walk_continue). The core walker's
        generator (``PageTable.walk_steps``), to run with ``yield from``: a visitor may
        return a generator instead of a result (a break-before-make or cmpxchg that yields
        its race points in a stepped walk); a walk whose visitors return none never yields
        (``run_plain``). It returns None, or the error that stopped the walk."""
        g = self._granule                       # _walk_range, inline: every fault walks
        start = addr & ~(g - 1)
        end = (addr + size + g - 1) & ~(g - 1)
        limit = self._phys_size
        if start > limit or end > limit:
            return _erange()
        return self.pt.walk_steps(
            start, end, visitor, flags & (LEAF | TABLE_PRE | TABLE_POST), flags, visit_invalid,
            None if flags & KVM_PGTABLE_WALK_HANDLE_FAULT else _not_eagain)

    def get_leaf(self, addr: int) -> tuple[int, int]:
        """kvm_pgtable_get_leaf: (pte, level) of the entry a hardware walk of ``addr`` ends
        on (a leaf, or the invalid entry that stops it)."""
        level, _table, _idx, pte = self.rt.lookup(addr)
        return pte, level

    def _set_event(self, ipa: int, level: int, old: int, new: int) -> None:
        """An in-place update without break-before-make, for the tests' event log."""
        self.events.append(("set", ipa, level, old, new))

    # ------------------------------------------------------------------ BBM primitives
    #
    # The fault path runs these once per fault: the pure tests on an entry (kvm_pte_valid,
    # stage2_pte_is_locked, stage2_pte_is_counted, kvm_pte_table) and mm_ops' page counts are
    # written inline as the bit tests they are; the steps themselves stay one method each.

    def _try_set_pte(self, ctx, new: int) -> bool:
        """stage2_try_set_pte: cmpxchg against the value the visitor read when shared."""
        table, index = ctx.table, ctx.index
        if ctx.arg & KVM_PGTABLE_WALK_SHARED and table[index] != ctx.pte:
            return False
        table[index] = ctx.pte = new            # ctx.set
        return True

    def _try_break_pte(self, ctx, why: str = "bbm") -> bool:
        """stage2_try_break_pte: LOCKED -> TLBI (by range for a table, by IPA + level for a
        leaf, named ``why``) -> drop the old entry's reference."""
        old = ctx.pte
        if old & _LOCKED_BITS == KVM_INVALID_PTE_LOCKED:          # stage2_pte_is_locked
            if not ctx.arg & KVM_PGTABLE_WALK_SHARED:
                logger.warning("stage2.locked_in_exclusive_walk", ipa=ctx.addr)
            return False
        if not self._try_set_pte(ctx, KVM_INVALID_PTE_LOCKED):
            return False
        self.events.append(("break", ctx.addr, ctx.level, old, KVM_INVALID_PTE_LOCKED))
        if old:
            if not ctx.arg & KVM_PGTABLE_WALK_SKIP_BBM_TLBI:
                if kvm_pte_table(old, ctx.level):
                    size = self.geom.size(ctx.level)
                    self.tlb_flush_vmid_range(ctx.addr & ~(size - 1), size, BBM_TABLE)
                elif old & KVM_PTE_VALID:
                    self.tlb_flush_vmid_ipa(ctx.addr, ctx.level, why)
            # stage2_pte_is_counted: mm_ops->put_page on the entry's table page.
            self._put_page(ctx.table_pa + ((ctx.index << 3) & self._page_mask))
        return True

    def _make_pte(self, ctx, new: int) -> None:
        """stage2_make_pte: only over LOCKED; take a reference for a counted entry."""
        if ctx.table[ctx.index] & _LOCKED_BITS != KVM_INVALID_PTE_LOCKED:
            raise AssertionError(f"stage2_make_pte over an unlocked entry at {ctx.addr:#x}")
        index = ctx.index
        if new:         # stage2_pte_is_counted: mm_ops->get_page
            self.page_count[ctx.table_pa + ((index << 3) & self._page_mask)] += 1
        ctx.table[index] = ctx.pte = new        # smp_store_release (ctx.set)
        self.events.append(("make", ctx.addr, ctx.level, KVM_INVALID_PTE_LOCKED, new))

    def _bbm(self, ctx, data, new, phys: int | None):
        """A break-before-make in a map walk (stage2_try_break_pte, the cache maintenance of
        a leaf at ``phys``, stage2_make_pte): 0, or -EAGAIN when the entry is another
        walker's (LOCKED: remembered in ``data.locked`` for the vCPU's wait) or changed since
        it was read. ``new`` None is a table from the memory cache, taken only at the make
        (no other walker can see it before). In a stepped shared walk, a generator that
        yields the race points."""
        if (ctx.arg & KVM_PGTABLE_WALK_SHARED
                and ctx.pte & _LOCKED_BITS == KVM_INVALID_PTE_LOCKED):
            data.locked = (ctx.table, ctx.index)
            return -errno.EAGAIN
        if data.steps:
            return self._bbm_steps(ctx, new, phys)
        if not self._try_break_pte(ctx, BBM_BLOCK_TO_TABLE if new is None else "bbm"):
            return -errno.EAGAIN
        if (phys is not None and not self._cmos_noop
                and not ctx.arg & KVM_PGTABLE_WALK_SKIP_CMO):
            self._cmos(ctx, new, phys)
        self._make_pte(ctx, self._new_table_pte() if new is None else new)
        return 0

    def _bbm_steps(self, ctx, new, phys: int | None):
        """``_bbm`` with its points: the old entry read, before the cmpxchg to LOCKED; then,
        the entry LOCKED and its TLBs invalidated (others that meet it back off), before the
        store of the new one."""
        yield ARM64_PTE_BREAK
        old = ctx.pte
        if not self._try_break_pte(ctx, BBM_BLOCK_TO_TABLE if new is None else "bbm"):
            return -errno.EAGAIN
        if (phys is not None and not self._cmos_noop
                and not ctx.arg & KVM_PGTABLE_WALK_SKIP_CMO):
            self._cmos(ctx, new, phys)
        key = (ctx.table_pa, ctx.index)
        self.bbm_windows[key] = old
        try:
            yield ARM64_PTE_MAKE
        finally:
            self.bbm_windows.pop(key, None)
        self._make_pte(ctx, self._new_table_pte() if new is None else new)
        return 0

    def _cmos(self, ctx, new: int, pa: int) -> None:
        """The cache maintenance of stage2_map_walker_try_leaf, between the TLBI and the make:
        D-cache clean+invalidate to PoC for cacheable memory (a no-op under FWB), I-cache
        invalidate to PoU for executable memory (a no-op with CTR_EL0.DIC)."""
        if not self.fwb and pte_memattr(new) == self._normal_memattr:
            self.events.append(("dcache_clean_inval_poc", ctx.addr, ctx.level, 0, pa))
        if not self.cache_dic and stage2_pte_executable(new):
            self.events.append(("icache_inval_pou", ctx.addr, ctx.level, 0, pa))

    # ------------------------------------------------------------------ map (§4.3, §4.4)

    def _leaf_mapping_allowed(self, ctx, data: _MapData) -> bool:
        """stage2_leaf_mapping_allowed: no block with force_pte, else
        kvm_block_mapping_supported (written inline: the map walker asks it at every level):
        the level allows blocks (kvm_level_supports_block_mapping), the entry fits the rest of
        the walk, and both the walk position and the PA are aligned to it.

        _walk_addr: kvm_pgtable_visit_ctx.addr is the walk's position (data->addr), in the
        first entry visited the walk's start, not the entry's base (the model's
        ``ctx.addr``): a walk of one page at the end of an invalid 2 MiB entry must not see
        the whole entry as inside the walk."""
        level = ctx.level
        if level != KVM_PGTABLE_LAST_LEVEL and (data.force_pte
                                                or level not in self._leaf_levels):
            return False
        start = ctx.start
        addr = ctx.addr
        if addr < start:
            addr = start
        granule = ctx.size
        if granule > ctx.end - addr:
            return False
        return not ((data.phys + (addr - start)) | addr) & (granule - 1)

    @staticmethod
    def pte_needs_update(old: int, new: int) -> bool:
        """stage2_pte_needs_update: the map path ignores a difference only in R/W/XN."""
        if not old & KVM_PTE_VALID or not new & KVM_PTE_VALID:
            return True
        return bool((old ^ new) & ~KVM_PTE_LEAF_ATTR_S2_PERMS)

    def _map_try_leaf(self, ctx, data: _MapData):
        """stage2_map_walker_try_leaf: -E2BIG where no leaf fits; nothing when only the
        permissions differ; in place for a software-bit change in an exclusive walk; else the
        break-before-make (a generator in a stepped shared walk)."""
        if not self._leaf_mapping_allowed(ctx, data):
            return -errno.E2BIG
        start = ctx.start
        addr = ctx.addr
        phys = data.phys + ((addr if addr > start else start) - start)    # _walk_addr
        new = self.fmt.init_valid_leaf_pte(phys, data.attr, ctx.level)
        old = ctx.pte
        # The 2020 rule (commit 694d071f8d85): same mapping or a permission-only difference is
        # left alone; a vCPU that needs more permission takes a permission fault.
        if not self.pte_needs_update(old, new):
            return -errno.EAGAIN
        if (not ctx.arg & KVM_PGTABLE_WALK_SHARED and old & KVM_PTE_VALID
                and not (old ^ new) & ~KVM_PTE_LEAF_ATTR_HI_SW):
            ctx.set(new)
            self._set_event(addr, ctx.level, old, new)
            return 0
        return self._bbm(ctx, data, new, phys)

    def _map_walk_table_pre(self, ctx, data: _MapData):
        """stage2_map_walk_table_pre: collapse a table into a block when one is allowed."""
        if not self._leaf_mapping_allowed(ctx, data):
            return 0
        child = self.fmt.table_address(ctx.pte, ctx.level)
        r = self._map_try_leaf(ctx, data)
        if type(r) is GeneratorType:
            return self._map_collapse(ctx, r, child)
        if not r:
            self._free_removed_table(ctx, child)
        return r

    def _map_collapse(self, ctx, bbm, child: int):
        ret = yield from bbm
        if not ret:
            self._free_removed_table(ctx, child)
        return ret

    def _free_removed_table(self, ctx, child: int) -> None:
        """The block replaced the table: free the detached subtree, after the shared walks in
        progress (which may be inside it) when this walk is shared."""
        if ctx.arg & KVM_PGTABLE_WALK_SHARED:
            self._free_unlinked_shared(child, ctx.level + 1, ctx.addr)
        else:
            self.free_unlinked(child, ctx.level + 1)

    def _map_walk_leaf(self, ctx, data: _MapData):
        """stage2_map_walk_leaf: a leaf where allowed, else a new table (splitting a valid
        block without populating the rest of it)."""
        r = self._map_try_leaf(ctx, data)
        if r != -errno.E2BIG:
            return r
        if ctx.level == KVM_PGTABLE_LAST_LEVEL:
            logger.error("stage2.map_leaf_at_last_level_refused", ipa=ctx.addr)
            return -errno.EINVAL
        # The table comes from the memory cache, which never runs dry here.
        return self._bbm(ctx, data, None, None)

    def _new_table_pte(self) -> int:
        """A table from the memory cache, as the entry that links it (kvm_init_table_pte)."""
        return self.fmt.init_table_pte(self._alloc_table())

    def map_steps(self, addr: int, size: int, phys: int, prot: int, flags: int = 0,
                  force_pte: bool = False, steps: bool = True):
        """kvm_pgtable_stage2_map as a generator: a shared walk with ``steps`` (a stepped
        flow's) yields the break/make race points of every entry it replaces. Returns
        ``(ret, locked)`` as ``map_walk``."""
        ret, attr = stage2_set_prot_attr(prot, self.fwb)
        if ret:
            return ret, None
        shared = flags & KVM_PGTABLE_WALK_SHARED
        data = _MapData(phys, attr, force_pte, steps and bool(shared))

        def visitor(ctx):
            """stage2_map_walker."""
            if ctx.flags == TABLE_PRE:
                return self._map_walk_table_pre(ctx, data)
            return self._map_walk_leaf(ctx, data)

        if shared:
            self.shared_walkers += 1
        try:
            ret = (yield from self.walk(addr, size, visitor, flags | LEAF | TABLE_PRE)) or 0
        finally:
            if shared:
                self._rcu_read_unlock()
        return ret, data.locked

    def map_walk(self, addr: int, size: int, phys: int, prot: int, flags: int = 0,
                 force_pte: bool = False) -> tuple[int, tuple | None]:
        """kvm_pgtable_stage2_map run to its end, without race points (nothing else runs
        meanwhile): the same walk as ``map_steps``. ``(ret, locked)``: ret 0, -EAGAIN (a
        LOCKED entry, or nothing to change), -EINVAL or -ERANGE; ``locked`` the (table,
        index) of the LOCKED entry behind an -EAGAIN, else None."""
        return run_plain(self.map_steps(addr, size, phys, prot, flags, force_pte, False))

    def map(self, addr: int, size: int, phys: int, prot: int, flags: int = 0,
            force_pte: bool = False) -> int:
        """kvm_pgtable_stage2_map: 0, -EAGAIN (race, LOCKED, or nothing to change), -EINVAL,
        -ERANGE."""
        return self.map_walk(addr, size, phys, prot, flags, force_pte)[0]

    # ------------------------------------------------------------------ unmap (§8)

    def unmap_defer_tlb_flush(self) -> bool:
        """stage2_unmap_defer_tlb_flush: FEAT_TLBIRANGE and FWB."""
        return self.tlbirange and self.fwb

    def unmap(self, addr: int, size: int) -> int:
        """kvm_pgtable_stage2_unmap: clear every leaf touching the range (whole blocks), free
        empty tables on the way back up, one TLBI per leaf unless deferred."""

        defer = self.unmap_defer_tlb_flush()

        def visitor(ctx):
            """stage2_unmap_walker (its entry tests written inline, as the map walker's)."""
            old = ctx.pte
            if not old & KVM_PTE_VALID:
                if old:                                 # stage2_pte_is_counted
                    ctx.set(0)
                    self._put_page(ctx.table_pa + ((ctx.index << 3) & self._page_mask))
                return 0
            child = None
            need_flush = False
            level = ctx.level
            if level != KVM_PGTABLE_LAST_LEVEL and old & _TABLE_BITS == _TABLE_BITS:
                if ctx.flags != TABLE_POST:
                    return 0
                child = old & self.fmt.addr_mask
                if self.page_count.get(child) != 1:
                    return 0
            elif pte_memattr(old) == self._normal_memattr:
                need_flush = not self.fwb
            # stage2_unmap_put_pte
            ctx.set(0)
            self.events.append(("clear", ctx.addr, level, old, 0))
            if child is not None:
                self.tlb_flush_vmid_ipa(ctx.addr, TLBI_TTL_UNKNOWN, "unmap_table")
            elif not defer:
                self.tlb_flush_vmid_ipa(ctx.addr, level, "unmap")
            self._put_page(ctx.table_pa + ((ctx.index << 3) & self._page_mask))
            if need_flush:
                self.events.append(("dcache_clean_inval_poc", ctx.addr, level, 0,
                                    self.fmt.pte_to_phys(old)))
            if child is not None:
                self._put_page(child)
            return 0

        ret = run_plain(self.walk(addr, size, visitor, LEAF | TABLE_POST, False)) or 0
        if defer:
            self.tlb_flush_vmid_range(addr, size, "unmap_deferred")
        return ret

    # ------------------------------------------------------------------ attribute walkers

    def update_leaf_attrs(self, addr: int, size: int, attr_set: int, attr_clr: int,
                          flags: int, steps: bool = False):
        """stage2_update_leaf_attrs / stage2_attr_walker, a generator returning ``(ret,
        data)``: in place, no BBM; an invalid leaf gives -EAGAIN (a LOCKED one, in a shared
        walk, is remembered in ``data.locked`` for the vCPU's wait); the I-cache is
        invalidated for a leaf that becomes executable; the cmpxchg, with the
        ``arm64_relax_cmpxchg`` point before it in a stepped shared walk."""
        data = _AttrData(attr_set, attr_clr)
        shared = flags & KVM_PGTABLE_WALK_SHARED
        steps = steps and shared

        def cmpxchg(ctx, old, new):
            if not self._try_set_pte(ctx, new):
                return -errno.EAGAIN
            self._set_event(ctx.addr, ctx.level, old, new)
            return 0

        def cmpxchg_steps(ctx, old, new):
            yield ARM64_RELAX_CMPXCHG
            return cmpxchg(ctx, old, new)

        def visitor(ctx):
            old = ctx.pte
            if not kvm_pte_valid(old):
                if shared and stage2_pte_is_locked(old):
                    data.locked = (ctx.table, ctx.index)
                return -errno.EAGAIN
            data.level, data.pte = ctx.level, old
            new = (old & ~attr_clr) | attr_set
            if new == old:
                return 0
            if stage2_pte_executable(new) and not stage2_pte_executable(old) \
                    and not self.cache_dic:
                self.events.append(("icache_inval_pou", ctx.addr, ctx.level, 0,
                                    self.fmt.pte_to_phys(old)))
            return cmpxchg_steps(ctx, old, new) if steps else cmpxchg(ctx, old, new)

        if shared:
            self.shared_walkers += 1
        try:
            ret = (yield from self.walk(addr, size, visitor, flags | LEAF)) or 0
        finally:
            if shared:
                self._rcu_read_unlock()
        return ret, data

    def relax_perms_steps(self, addr: int, prot: int, flags: int = FAULT_WALK_FLAGS,
                          steps: bool = True):
        """kvm_pgtable_stage2_relax_perms as a generator (6.17, single XN bit: set S2AP_R/W,
        clear XN when X is asked; its race point in a shared walk of a stepped flow:
        ``arm64_relax_cmpxchg``): on one leaf; a local TLBI after success and after -EAGAIN.
        Returns ``(ret, locked)`` as ``map_walk``."""
        if int(prot) & KVM_PTE_LEAF_ATTR_HI_SW:
            return -errno.EINVAL, None
        set_, clr = 0, 0
        if prot & PROT_R:
            set_ |= KVM_PTE_LEAF_ATTR_LO_S2_S2AP_R
        if prot & PROT_W:
            set_ |= KVM_PTE_LEAF_ATTR_LO_S2_S2AP_W
        if prot & PROT_X:
            clr |= KVM_PTE_LEAF_ATTR_HI_S2_XN
        ret, data = yield from self.update_leaf_attrs(addr, 1, set_, clr, flags, steps)
        if ret in (0, -errno.EAGAIN):
            self.tlb_flush_vmid_ipa(addr, data.level, "relax_perms", nsh=True)
        return ret, data.locked

    def relax_perms_walk(self, addr: int, prot: int,
                         flags: int = FAULT_WALK_FLAGS) -> tuple[int, tuple | None]:
        """kvm_pgtable_stage2_relax_perms run to its end (the walk of ``relax_perms_steps``
        without its race point)."""
        return run_plain(self.relax_perms_steps(addr, prot, flags, False))

    def relax_perms(self, addr: int, prot: int, flags: int = FAULT_WALK_FLAGS) -> int:
        """kvm_pgtable_stage2_relax_perms: 0, -EAGAIN, -EINVAL."""
        return self.relax_perms_walk(addr, prot, flags)[0]

    def mkyoung(self, addr: int, flags: int = FAULT_WALK_FLAGS) -> int:
        """kvm_pgtable_stage2_mkyoung: AF on the one valid leaf; no TLBI (AF=0 entries are
        not cached)."""
        return run_plain(self.update_leaf_attrs(addr, 1, KVM_PTE_LEAF_ATTR_LO_S2_AF, 0,
                                                flags))[0]

    def wrprotect(self, addr: int, size: int) -> int:
        """kvm_pgtable_stage2_wrprotect: clear S2AP_W on every valid leaf, exclusive walk,
        no TLBI (the caller flushes): the core's ``RadixTable.wrprotect``."""
        start, end = self._walk_range(addr, size)
        if start is None:
            return -errno.ERANGE
        self.rt.wrprotect(start, end)
        return 0

    def test_clear_young(self, addr: int, size: int, mkold: bool) -> bool:
        """kvm_pgtable_stage2_test_clear_young / stage2_age_walker: no TLBI (the core's
        ``RadixTable.test_clear_young``, AF being the format's accessed bit)."""
        start, end = self._walk_range(addr, size)
        return start is not None and self.rt.test_clear_young(start, end, mkold)

    # ------------------------------------------------------------------ split (§7)

    @staticmethod
    def block_get_nr_page_tables(geom: Stage2Geometry, level: int) -> int:
        """stage2_block_get_nr_page_tables: pages to split a block at ``level`` to PTEs."""
        if level == KVM_PGTABLE_LAST_LEVEL:
            return 0
        if level == 2:
            return 1
        if level == 1:
            return geom.ptrs_per_pte + 1
        return -errno.EINVAL

    def create_unlinked(self, phys: int, level: int, prot: int, force_pte: bool) -> int:
        """kvm_pgtable_stage2_create_unlinked: a detached table that maps the block at
        ``level`` with ``prot`` (fully populated down to pages when ``force_pte``)."""
        ret, attr = stage2_set_prot_attr(prot, self.fwb)
        if ret:
            raise ValueError(f"create_unlinked: prot {prot!r} refused ({ret})")
        return self._build_unlinked(phys, level + 1, attr, force_pte)

    def _build_unlinked(self, phys: int, level: int, attr: int, force_pte: bool) -> int:
        table = self._alloc_table()
        entries = self.store[table]
        size = self.geom.size(level)
        to_pages = force_pte and level < KVM_PGTABLE_LAST_LEVEL
        for i in range(self.geom.ptrs_per_pte):
            pa = phys + i * size
            if to_pages or not self.geom.level_supports_block(level):
                child = self._build_unlinked(pa, level + 1, attr, force_pte)
                entries[i] = self.fmt.init_table_pte(child)
            else:
                entries[i] = self.fmt.init_valid_leaf_pte(pa, attr, level)
        self.page_count[table] += self.geom.ptrs_per_pte
        return table

    def split(self, addr: int, size: int) -> int:
        """kvm_pgtable_stage2_split / stage2_split_walker: every valid block in the range
        becomes a table of pages with the block's R/W/X/SW, AF=1 and Normal MemAttr."""

        def visitor(ctx):
            old = ctx.pte
            if ctx.level == KVM_PGTABLE_LAST_LEVEL or not kvm_pte_valid(old):
                return 0
            nr = self.block_get_nr_page_tables(self.geom, ctx.level)
            if nr < 0:
                return nr
            phys = self.fmt.pte_to_phys(old)
            prot = kvm_pgtable_stage2_pte_prot(old)
            child = self.create_unlinked(phys, ctx.level, prot, force_pte=True)
            if not self._try_break_pte(ctx):
                self.free_unlinked(child, ctx.level + 1)
                return -errno.EAGAIN
            self._make_pte(ctx, self.fmt.init_table_pte(child))
            return 0

        return run_plain(self.walk(addr, size, visitor, LEAF, visit_invalid=False)) or 0

    # ------------------------------------------------------------------ introspection

    def valid_leaves(self, start: int, end: int) -> list:
        """(ipa, level, pte) of every valid leaf touching [start, end), ascending (an
        enumeration that changes nothing and lets no flow run: ``snapshot``)."""
        return list(self.rt.leaves(start, end, snapshot=True))

    def check(self) -> list[str]:
        """The page-table half of the reference's §10 invariants (1, 2, 3, 6, 16): the
        format's (linkage, leaked tables, leaf levels and alignment) are the core's
        (``RadixTable.check``), with the subtrees a shared walk unlinked and has not freed
        yet; the encoding, LOCKED entries and page counts are checked here."""
        g, start = self.geom, self.geom.start_level
        memattrs = {memattr_value(k, self.fwb) for k in ("normal", "normal_nc", "device")}
        locked: collections.Counter = collections.Counter()

        def judge(table_pa, idx, level, ipa, pte):
            if not kvm_pte_valid(pte):
                if not stage2_pte_is_locked(pte):
                    return [" is an invalid non-zero entry (no owner annotations exist on a "
                            "guest stage-2)"], pte
                # try_break_pte dropped the LOCKED entry's reference (invariant 16).
                locked[self._page_of(table_pa, idx)] += 1
                old = self.bbm_windows.get((table_pa, idx))
                if old is None:
                    return [" is LOCKED outside a break-before-make window"], pte
                return [], old      # a table it replaces is freed only after the make
            if kvm_pte_table(pte, level):
                bad = pte & ~(self.fmt.addr_mask | KVM_PTE_TYPE | KVM_PTE_VALID)
                return [" is a table entry with attribute bits"] if bad else [], pte
            return self._check_leaf(pte, level, ipa, memattrs), pte

        def entry(table_pa, pos, idx, ipa, pte):
            found, in_place = judge(table_pa, idx, start + pos, ipa, pte)
            where = f"level-{start + pos} entry for IPA {ipa:#x} ({pte:#018x})" if found else ""
            return [where + m for m in found], in_place

        # Unlinked by a shared walker, still allocated until the walks in progress end.
        detached = [(pa, level - start, ipa) for pa, level, ipa in self.rcu_deferred]
        problems = self.rt.check("stage-2", entry, detached)
        ptrs = g.ptrs_per_pte
        for pa, table in self.store.tables.items():
            for first in range(0, len(table), ptrs):
                page = pa + first * 8
                cnt = 1 + ptrs - table[first:first + ptrs].count(0) - locked[page]
                have = self.page_count.get(page)
                if have != cnt:
                    problems.append(f"table page {page:#x}: page_count {have} but 1 + "
                                    f"{cnt - 1} counted entries")
        return problems

    def _check_leaf(self, pte: int, level: int, ipa: int, memattrs) -> list[str]:
        g = self.geom
        out = []
        if level == KVM_PGTABLE_LAST_LEVEL and not pte & KVM_PTE_TYPE:
            out.append(": a level-3 leaf with TYPE=0 is reserved")
        if (pte & KVM_PTE_LEAF_ATTR_LO_S2_SH) >> 8 != KVM_PTE_LEAF_ATTR_LO_S2_SH_IS:
            out.append(": SH is not Inner Shareable")
        ma = pte_memattr(pte)
        if ma not in memattrs:
            out.append(f": MemAttr {ma:#x} is not one KVM writes (FWB={self.fwb})")
        if ma != self._normal_memattr and stage2_pte_executable(pte):
            out.append(": device / Normal-NC leaf is executable")
        if pte & (KVM_PTE_CONT | KVM_PTE_DBM | 1 << 11 | GENMASK(50, KVM_PTE_ADDR_HI + 1)
                  | GENMASK(63, 59)):
            out.append(": bits KVM never sets (Contiguous, DBM, bit 11, OA above "
                       "bit 47 or bits [63:59]) are set")
        if pte & (GENMASK(self.fmt.page_shift - 1, 12) if self.fmt.page_shift > 12 else 0):
            out.append(": output-address bits below the granule are set")
        if ipa + g.size(level) > g.phys_size:
            out.append(f": maps beyond the {g.ipa_bits}-bit IPA space")
        return out
