"""A picture of a JSONL trace (``loadfsm trace --plot``; the ``[plot]`` extra, matplotlib).

Panels: the ledger's memory over time against the floor (final + largest layer) and the
naive peak (the whole model at full precision, then quantized); for a trace with pushes,
the bytes committed over time and each rollback; and the lifecycle of every layer (time
on x, layers on y, colour by state; a push's reload states hatched).
"""

from __future__ import annotations

from pathlib import Path

from .trace_timeline import Timeline, floor_bytes, naive_peak_bytes, read_events, timeline

STATE_COLOURS = {"META": "#bdbdbd", "PARTIAL": "#fdae61", "COMPLETE": "#fee08b",
                 "QUANTIZED": "#abd9e9", "FINALIZED": "#1a9850"}
ROLLED_BACK = "#d73027"


def write_plot(trace: str | Path, out: str | Path, *, width: float = 8.0,
               dpi: int = 100) -> tuple[int, int]:
    """Draw ``trace`` into the image ``out`` (format from its suffix) without a display.

    Returns:
        The image's (width, height) in pixels.

    Raises:
        ImportError: matplotlib is missing (``pip install 'loadfsm[plot]'``).
    """
    try:
        from matplotlib.figure import Figure
    except ImportError as exc:
        raise ImportError("--plot needs matplotlib: pip install 'loadfsm[plot]'") from exc
    tl = timeline(read_events(trace))
    panels = [_memory] + ([_committed] if tl.committed or tl.rollbacks else []) + [_lifecycle]
    ratios = [2] * (len(panels) - 1) + [3]
    fig = Figure(figsize=(width, 1.8 * sum(ratios) / 2 + 0.6), dpi=dpi)   # no pyplot: no display
    axes = fig.subplots(len(panels), 1, sharex=True, gridspec_kw={"height_ratios": ratios})
    for ax, panel in zip(axes, panels):
        panel(ax, tl)
    axes[-1].set_xlabel("time since the session began (ms)")
    fig.tight_layout()
    fig.savefig(out)
    w, h = fig.get_size_inches() * fig.dpi
    return round(w), round(h)


def _ms(t: float) -> float:
    return t * 1e3


def _memory(ax, tl: Timeline) -> None:
    mb = 2 ** 20
    if tl.memory:
        t = [_ms(p[0]) for p in tl.memory]
        ax.step(t, [(s + f) / mb for _, s, f in tl.memory], where="post", label="held (ledger)")
        ax.step(t, [s / mb for _, s, _ in tl.memory], where="post", lw=0.8, label="staging")
    peak = tl.totals.get("peak_bytes")
    for value, style, label in ((peak, "-.", "peak (report)"),
                                (floor_bytes(tl), "--", "floor: final + largest layer"),
                                (naive_peak_bytes(tl), ":", "naive peak")):
        if value is not None:
            ax.axhline(value / mb, ls=style, color="k", lw=1, label=label)
    ax.set_ylabel("MB")
    ax.set_ylim(0, ax.get_ylim()[1] * 1.4)          # room for the legend above the lines
    ax.set_title("memory over time")
    ax.legend(fontsize="x-small", loc="upper left", ncol=3)


def _committed(ax, tl: Timeline) -> None:
    total, xs, ys = 0, [0.0], [0.0]
    for t, n in tl.committed:
        total += n
        xs.append(_ms(t))
        ys.append(total / 2 ** 20)
    ax.step(xs, ys, where="post", label="committed")
    for i, t in enumerate(tl.rollbacks):
        ax.axvline(_ms(t), color=ROLLED_BACK, label="rollback" if i == 0 else None)
    ax.set_ylabel("MB")
    ax.set_title("pushes: bytes committed (running total)")
    ax.legend(fontsize="small", loc="upper left")


def _lifecycle(ax, tl: Timeline) -> None:
    layers = list(tl.spans)
    for y, layer in enumerate(layers):
        for span in tl.spans[layer]:
            colour = ROLLED_BACK if span.rolled_back else STATE_COLOURS[span.state]
            ax.broken_barh([(_ms(span.start), max(_ms(span.end - span.start), 1e-3))],
                           (y - 0.4, 0.8), facecolors=colour,
                           hatch="//" if span.reload else None, lw=0)
    for t in tl.rollbacks:
        ax.axvline(_ms(t), color=ROLLED_BACK, lw=1)
    ax.set_yticks(range(len(layers)), labels=layers if len(layers) <= 40 else None,
                  fontsize=5)
    ax.invert_yaxis()
    ax.set_title("layer lifecycle")
    from matplotlib.patches import Patch
    handles = [Patch(color=c, label=s) for s, c in STATE_COLOURS.items()]
    ax.legend(handles=handles + [Patch(color=ROLLED_BACK, label="rolled back")],
              fontsize="x-small", ncol=6, loc="upper center", bbox_to_anchor=(0.5, -0.25))
