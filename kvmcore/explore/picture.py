"""A swim-lane picture of one schedule (``kvmcore explore --replay ID --picture FILE``): one
lane per flow, one column per step, each step labelled with the race point the flow reached
and what it holds there; the failing step is marked."""

from __future__ import annotations

LANE_COLOURS = ("#4c72b0", "#55a868", "#c44e52", "#8172b2")


def draw(run, scn, path: str, title: str = "") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = scn.flow_names()
    steps = run.trace
    width = max(6.0, 1.3 * len(steps) + 2)
    fig, ax = plt.subplots(figsize=(width, 1.2 + 0.9 * len(names)))
    for lane in range(len(names)):
        ax.axhline(lane, color="#dddddd", zorder=0)
    for x, event in enumerate(steps):
        lane = names.index(event["flow"])
        colour = LANE_COLOURS[lane % len(LANE_COLOURS)]
        if "point" in event:
            label = event["point"] + ("\n" + ", ".join(event["holds"]) if event["holds"]
                                      else "")
            marker = "o"
        else:
            label = "end: " + event["outcome"]
            marker = "s"
        ax.plot(x, lane, marker, color=colour, markersize=10, zorder=2)
        ax.annotate(label, (x, lane), textcoords="offset points", xytext=(0, 10),
                    ha="center", fontsize=7)
    if run.failure is not None and steps:
        x = len(steps) - 1
        ax.axvline(x, color="#c44e52", linestyle="--", zorder=1)
        ax.annotate(f"{run.failure.kind}: {run.failure.message[:90]}", (x, -0.6),
                    ha="right", fontsize=7, color="#c44e52")
    ax.set_yticks(range(len(names)))
    ax.set_yticklabels([f"{n}: {f['op']}" for n, f in zip(names, scn.flows, strict=True)])
    ax.set_xticks(range(len(steps)))
    ax.set_xlabel("step")
    ax.set_xlim(-0.8, max(len(steps) - 0.2, 1))
    ax.set_ylim(-1, len(names) - 0.3)
    ax.invert_yaxis()
    ax.set_title(title or scn.name, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
