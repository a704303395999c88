"""Stage-2 geometry: granule, IPA size, level count, start level, concatenated roots, VTCR_EL2.

Mirrors ``arch/arm64/include/asm/stage2_pgtable.h`` (``stage2_pgtable_levels``),
``asm/kvm_arm.h`` (``VTCR_EL2_*``), ``hyp/pgtable.c`` (``kvm_get_vtcr``,
``kvm_pgd_pages``, ``kvm_granule_shift``, ``kvm_block_mapping_supported``) and
``mmu.c`` (``kvm_init_ipa_range``). See shared/reference/arm64_stage2.md §2.

Model simplifications: the CPU's PARange is 48 bits and there is no LPA2, so the IPA limit
(``get_kvm_ipa_limit``) is 48 and stage-2 never needs 52-bit output addresses; VTCR_EL2.DS is
never set and SH is always encoded in leaves.
"""

from __future__ import annotations

import errno

import attrs
from kvmcore.errors import KvmError
from kvmcore.pgtable import Geometry

GRANULES = (4096, 16384, 65536)

KVM_PGTABLE_LAST_LEVEL = 3
#: KVM_PHYS_SHIFT: the IPA size of a VM created with IPA size 0.
KVM_PHYS_SHIFT = 40
#: ARM64_MIN_PARANGE_BITS.
ARM64_MIN_PARANGE_BITS = 32
#: The modelled CPU's ID_AA64MMFR0_EL1.PARange (and get_kvm_ipa_limit()): 48 bits.
KVM_IPA_LIMIT = 48

# VTCR_EL2 fields [ARM] (asm/kvm_arm.h).
VTCR_EL2_T0SZ_MASK = 0x3F
VTCR_EL2_SL0_SHIFT = 6
VTCR_EL2_IRGN0_WBWA = 1 << 8
VTCR_EL2_ORGN0_WBWA = 1 << 10
VTCR_EL2_SH0_INNER = 3 << 12
VTCR_EL2_TG0_SHIFT = 14
VTCR_EL2_TG0 = {4096: 0b00, 65536: 0b01, 16384: 0b10}
VTCR_EL2_PS_SHIFT = 16
VTCR_EL2_VS_16BIT = 1 << 19
VTCR_EL2_HA = 1 << 21
VTCR_EL2_HD = 1 << 22
VTCR_EL2_RES1 = 1 << 31
VTCR_EL2_DS = 1 << 32
#: PS / PARange encodings 0..6.
PARANGE_BITS = (32, 36, 40, 42, 44, 48, 52)


def page_shift_of(granule: int) -> int:
    return granule.bit_length() - 1


def granule_shift(page_shift: int, level: int) -> int:
    """kvm_granule_shift / ARM64_HW_PGTABLE_LEVEL_SHIFT: log2 of what one entry at
    ``level`` maps."""
    return (page_shift - 3) * (4 - level) + 3


def min_block_level(granule: int) -> int:
    """KVM_PGTABLE_MIN_BLOCK_LEVEL: 1 for 4K pages, 2 for 16K and 64K."""
    return 1 if granule == 4096 else 2


def stage2_pgtable_levels(ipa_bits: int, page_shift: int) -> int:
    """stage2_pgtable_levels = ARM64_HW_PGTABLE_LEVELS(ipa - 4), at least 2 (kvm_get_vtcr):
    the 4 spare bits allow up to 16 concatenated root tables instead of a level -1."""
    return max(2, (ipa_bits - 8) // (page_shift - 3))


def kvm_pgd_pages(ipa_bits: int, start_level: int, page_shift: int) -> int:
    """kvm_pgd_pages: number of concatenated root pages."""
    return (((1 << ipa_bits) - 1) >> granule_shift(page_shift, start_level - 1)) + 1


@attrs.frozen
class Stage2Geometry:
    """The shape of one VM's stage-2 (``struct kvm_pgtable`` ia_bits/start_level plus the
    VTCR_EL2 that produced them)."""

    granule: int
    ipa_bits: int
    hw_af: bool = False
    # Derived once (the walks read them on every access): see the functions above.
    page_shift: int = attrs.field(init=False, eq=False, repr=False)
    ptrs_per_pte: int = attrs.field(init=False, eq=False, repr=False)
    levels: int = attrs.field(init=False, eq=False, repr=False)
    start_level: int = attrs.field(init=False, eq=False, repr=False)
    root_pages: int = attrs.field(init=False, eq=False, repr=False)
    min_block_level: int = attrs.field(init=False, eq=False, repr=False)
    phys_size: int = attrs.field(init=False, eq=False, repr=False)
    _sizes: tuple = attrs.field(init=False, eq=False, repr=False)

    def __attrs_post_init__(self):
        if self.granule not in GRANULES:
            raise KvmError(errno.EINVAL, f"granule={self.granule}: must be one of {GRANULES}")
        if not ARM64_MIN_PARANGE_BITS <= self.ipa_bits <= KVM_IPA_LIMIT:
            raise KvmError(errno.EINVAL, f"ipa_bits={self.ipa_bits}: must lie in "
                           f"[{ARM64_MIN_PARANGE_BITS}, {KVM_IPA_LIMIT}] (kvm_init_ipa_range)")
        page_shift = page_shift_of(self.granule)
        levels = stage2_pgtable_levels(self.ipa_bits, page_shift)
        derived = {
            "page_shift": page_shift,
            "ptrs_per_pte": 1 << (page_shift - 3),
            "levels": levels,
            "start_level": 4 - levels,
            "root_pages": kvm_pgd_pages(self.ipa_bits, 4 - levels, page_shift),
            "min_block_level": min_block_level(self.granule),
            # kvm_phys_size: 2^ipa_bits.
            "phys_size": 1 << self.ipa_bits,
            "_sizes": tuple(1 << granule_shift(page_shift, lvl) for lvl in range(4)),
        }
        for name, value in derived.items():
            object.__setattr__(self, name, value)

    @classmethod
    def from_options(cls, granule=4096, ipa_bits=0, hw_af=False) -> Stage2Geometry:
        """kvm_init_ipa_range: IPA size 0 means KVM_PHYS_SHIFT."""
        try:
            granule, ipa_bits = int(granule), int(ipa_bits)
        except (TypeError, ValueError):
            raise KvmError(errno.EINVAL, f"granule={granule!r} / ipa_bits={ipa_bits!r}: "
                           "not integers") from None
        return cls(granule, ipa_bits or KVM_PHYS_SHIFT, bool(hw_af))

    # ------------------------------------------------------------------ sizes per level

    def shift(self, level: int) -> int:
        return granule_shift(self.page_shift, level)

    def size(self, level: int) -> int:
        """kvm_granule_size(level)."""
        return self._sizes[level]

    @property
    def pmd_size(self) -> int:
        return self.size(2)

    @property
    def pud_size(self) -> int:
        return self.size(1)

    def level_supports_block(self, level: int) -> bool:
        """kvm_level_supports_block_mapping."""
        return level >= self.min_block_level

    def supported_block_sizes(self) -> tuple[int, ...]:
        """kvm_supported_block_sizes, largest first (the PAGE_SIZE leaf included)."""
        return tuple(self.size(lvl)
                     for lvl in range(self.min_block_level, KVM_PGTABLE_LAST_LEVEL + 1))

    def is_block_size_supported(self, size: int) -> bool:
        """kvm_is_block_size_supported."""
        return size > 0 and size & (size - 1) == 0 and size in self.supported_block_sizes()

    def level_of_size(self, size: int) -> int:
        for lvl in range(self.start_level, KVM_PGTABLE_LAST_LEVEL + 1):
            if self.size(lvl) == size:
                return lvl
        raise ValueError(f"no stage-2 level maps {size:#x} bytes with a {self.granule} granule")

    # ------------------------------------------------------------------ VTCR_EL2

    @property
    def sl0_base(self) -> int:
        """VTCR_EL2_TGRAN_SL0_BASE: 2 for 4K, 3 for 16K and 64K."""
        return 2 if self.granule == 4096 else 3

    @property
    def sl0(self) -> int:
        """VTCR_EL2_LVLS_TO_SL0(levels) = base - (4 - levels)."""
        return self.sl0_base - self.start_level

    @property
    def t0sz(self) -> int:
        return 64 - self.ipa_bits

    @property
    def ps(self) -> int:
        return PARANGE_BITS.index(KVM_IPA_LIMIT)

    @property
    def vtcr(self) -> int:
        """kvm_get_vtcr: HA only when the model's hardware AF update is on; HD, DS and SL2
        never."""
        v = (VTCR_EL2_RES1 | VTCR_EL2_SH0_INNER | VTCR_EL2_ORGN0_WBWA | VTCR_EL2_IRGN0_WBWA
             | VTCR_EL2_TG0[self.granule] << VTCR_EL2_TG0_SHIFT
             | self.ps << VTCR_EL2_PS_SHIFT | (self.t0sz & VTCR_EL2_T0SZ_MASK)
             | self.sl0 << VTCR_EL2_SL0_SHIFT | VTCR_EL2_VS_16BIT)
        if self.hw_af:
            v |= VTCR_EL2_HA
        return v

    @staticmethod
    def decode_vtcr(vtcr: int) -> tuple[int, int]:
        """(ia_bits, start_level) as __kvm_pgtable_stage2_init derives them from VTCR_EL2."""
        ia_bits = 64 - (vtcr & VTCR_EL2_T0SZ_MASK)
        tg0 = (vtcr >> VTCR_EL2_TG0_SHIFT) & 3
        granule = {v: k for k, v in VTCR_EL2_TG0.items()}[tg0]
        sl0 = (vtcr >> VTCR_EL2_SL0_SHIFT) & 3
        base = 2 if granule == 4096 else 3
        return ia_bits, base - sl0

    # ------------------------------------------------------------------ the core's view

    def core_geometry(self) -> Geometry:
        """kvmcore.pgtable.Geometry: root first. The root's index bits cover all
        ``root_pages`` concatenated pages (a root that needs fewer than PTRS_PER_PTE entries is
        still a whole page, as kvm_pgd_pages allocates it); IPAs below 2^ipa_bits index it
        exactly as the hardware does."""
        levels = tuple(range(self.start_level, KVM_PGTABLE_LAST_LEVEL + 1))
        shifts = tuple(self.shift(lvl) for lvl in levels)
        root_bits = (self.root_pages * self.ptrs_per_pte).bit_length() - 1
        bits = (root_bits,) + (self.page_shift - 3,) * (len(levels) - 1)
        return Geometry(shifts=shifts, bits=bits, level_ids=levels, ia_bits=self.ipa_bits)
