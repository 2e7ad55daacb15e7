"""A picture of a bit plan: layer scores as bars, coloured by the weight width each layer got."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Mapping, Sequence

from edgeq.bitplan import BitPlan

_BIT_COLOURS = {2: "#d73027", 3: "#fc8d59", 4: "#fee08b", 5: "#d9ef8b", 6: "#91cf60", 7: "#66bd63", 8: "#1a9850"}


def spans_decades(values: Sequence[float], decades: float = 2.0) -> bool:
    """Whether the positive values span more than ``decades`` orders of magnitude (and none is negative, which a
    log axis cannot show)."""
    positive = [v for v in values if v > 0]
    if len(positive) < 2 or any(v < 0 for v in values):
        return False
    return max(positive) / min(positive) > 10 ** decades


def plot_plan(scores: Mapping[str, float], plan: BitPlan, path: str | os.PathLike, title: str | None = None,
              order: Sequence[str] | None = None) -> Path:
    """Write a PNG with two aligned panels, one column per layer: the score (bars coloured by weight bits) above, and the chosen weight
    bits (bars) with activation bits (black ticks) below. Uses matplotlib's Agg canvas directly,
    so it needs no display and leaves the global backend alone.

    Column order: ``order`` if given, else the plan's own layer order (execution order for a
    plan fresh from :func:`edgeq.plan.allocate.allocate`), else ``scores`` order; layers in
    ``scores`` but not in that order are appended. Layers without a score show an empty bar.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    if order is None:
        order = list(plan.layers) if plan.layers else list(scores)
    names = list(dict.fromkeys(list(order) + [name for name in scores if name not in set(order)]))
    if not names:
        raise ValueError("nothing to plot: no scores and no planned layers")
    values = [float(scores.get(name, 0.0)) for name in names]
    bits = [plan.bits_for(name) for name in names]
    colours = [_BIT_COLOURS.get(b.a if name.rsplit(".", 1)[-1].startswith("matmul_") else b.w, "#999999")
               for name, b in zip(names, bits)]
    positions = list(range(len(names)))

    width = min(max(8.0, 0.22 * len(names) + 2.0), 60.0)
    fig = Figure(figsize=(width, 6.5), constrained_layout=True)
    FigureCanvasAgg(fig)
    top, bottom = fig.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [3, 2]})

    top.bar(positions, values, color=colours, edgecolor="black", linewidth=0.3)
    top.set_ylabel("layer score")
    if spans_decades(values):  # on a linear axis the largest scores flatten every other bar to nothing
        top.set_yscale("log")
        top.set_ylabel("layer score (log scale)")
    top.grid(axis="y", alpha=0.3)
    method = plan.provenance.get("method", "plan")
    budget = plan.provenance.get("budget")
    heading = title or f"{method} bit plan" + (f" ({', '.join(map(str, budget))})" if budget else "")
    top.set_title(heading)
    used = sorted({b.a if name.rsplit(".", 1)[-1].startswith("matmul_") else b.w for name, b in zip(names, bits)})
    top.legend(handles=[Patch(color=_BIT_COLOURS.get(w, "#999999"), label=f"w{w}") for w in used],
               title="weight bits (matmuls: activation bits)", loc="upper right", fontsize=8, ncols=len(used))

    matmul = [name.rsplit(".", 1)[-1].startswith("matmul_") for name in names]
    weight_pos = [p for p, mm in zip(positions, matmul) if not mm]
    bottom.bar(weight_pos, [bits[p].w for p in weight_pos], color=[colours[p] for p in weight_pos],
               edgecolor="black", linewidth=0.3, label="weight bits")
    matmul_pos = [p for p, mm in zip(positions, matmul) if mm]
    if matmul_pos:  # no weight: a hatched bar at the activation width
        bottom.bar(matmul_pos, [bits[p].a for p in matmul_pos], color="white", edgecolor="#777777",
                   hatch="///", linewidth=0.3, label="attention matmul (activations only)")
    bottom.scatter(positions, [b.a for b in bits], marker="_", s=120, color="black", label="activation bits", zorder=3)
    bottom.set_ylabel("bits")
    bottom.set_ylim(0, 10.5)
    bottom.set_yticks([2, 3, 4, 6, 8])
    bottom.grid(axis="y", alpha=0.3)
    bottom.legend(loc="upper right", fontsize=8, ncols=3)
    bottom.set_xticks(positions)
    bottom.set_xticklabels(names, rotation=90, fontsize=6 if len(names) > 40 else 7)
    bottom.set_xlim(-0.6, len(names) - 0.4)

    from edgeq.fileio import replace_unless_interrupted

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.stem}.{os.getpid()}.partial.png")
    try:
        fig.savefig(partial, dpi=120)
        replace_unless_interrupted(partial, path)
    finally:
        partial.unlink(missing_ok=True)
    return path
