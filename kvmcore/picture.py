"""A picture of the guest-physical map: memslots, private/shared attributes, and what is
mapped at which leaf size, drawn with matplotlib (``kvmcore run --picture FILE``)."""

from __future__ import annotations

from collections import defaultdict

from .uapi import KVM_MEMORY_ATTRIBUTE_PRIVATE, PAGE_SHIFT

SIZE_COLOURS = {4096: "#4c72b0", 16384: "#64b5cd", 65536: "#8172b2", 1 << 21: "#55a868",
                1 << 25: "#937860", 1 << 29: "#da8bc3", 1 << 30: "#c44e52"}


def _merge(spans, min_width: int = 0):
    """Spans of one kind as few bars as possible (a 4 GiB map has 10^6 leaves): each is at
    least ``min_width`` wide, so a lone 4 KiB page stays visible, and touching bars merge."""
    out = []
    for start, length in sorted(spans):
        length = max(length, min_width)
        if out and out[-1][0] + out[-1][1] >= start:
            out[-1] = (out[-1][0], max(out[-1][1], start + length - out[-1][0]))
        else:
            out.append((start, length))
    return out


def draw(vm, path: str, title: str = "") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    gib = float(1 << 30)
    rows = ["memslots", "attributes", "mapped"]
    fig, ax = plt.subplots(figsize=(11, 3.2))
    slots = [(s.base_gfn << PAGE_SHIFT, s.npages << PAGE_SHIFT) for s in vm.all_memslots()
             if s.as_id == 0]
    ax.broken_barh([(a / gib, n / gib) for a, n in slots], (2.1, 0.8), facecolors="#999999",
                   edgecolors="black", linewidth=0.5)
    private = [(s << PAGE_SHIFT, (e - s) << PAGE_SHIFT) for s, e, v in vm.attributes.runs()
               if v & KVM_MEMORY_ATTRIBUTE_PRIVATE]
    ax.broken_barh([(a / gib, n / gib) for a, n in _merge(private)], (1.1, 0.8),
                   facecolors="#dd8452")
    end_bytes = max([a + n for a, n in slots] + [1 << 30])
    by_size = defaultdict(list)
    for m in vm.mappings():
        by_size[m.size].append((m.gfn << PAGE_SHIFT, m.size))
    for size, spans in sorted(by_size.items()):
        ax.broken_barh([(a / gib, n / gib) for a, n in _merge(spans, end_bytes // 1500)],
                       (0.1, 0.8), facecolors=SIZE_COLOURS.get(size, "#333333"))
    ax.set_yticks([2.5, 1.5, 0.5], rows)
    ax.set_xlabel("guest physical address (GiB)")
    end = end_bytes / gib
    ax.set_xlim(0, end)
    handles = [Patch(color="#999999", label="memslot"), Patch(color="#dd8452", label="private")]
    handles += [Patch(color=SIZE_COLOURS.get(s, "#333333"),
                      label=f"mapped {s >> 10} KiB" if s < 1 << 20 else f"mapped {s >> 20} MiB")
                for s in sorted(by_size)]
    ax.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, -0.3), ncol=6,
              fontsize=8, frameon=False)
    ax.set_title(title or repr(vm))
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
