"""Loss-curve PNGs written into checkpoint folders (corrector training, end-to-end distillation).

Plotting is kept out of the training modules; matplotlib is imported only when a curve is drawn.
"""

from __future__ import annotations

import io
from typing import Any


def _png(fig: Any) -> bytes:
    """The figure as PNG bytes (the figure is closed)."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def loss_curve_png(history: list[dict[str, Any]]) -> bytes | None:
    """The block-training losses (one line per block) and the distillation curve, as PNG bytes.

    Only the stages that ran get a panel, so a run without end-to-end distillation shows no empty axes.
    """
    block = [h for h in history if h["stage"] == "block"]
    distill = [h["loss"] for h in history if h["stage"] == "distill"]
    if not block and not distill:
        return None
    plt = _pyplot()
    panels = int(bool(block)) + int(bool(distill))
    fig, axes = plt.subplots(1, panels, figsize=(5.5 * panels, 4), squeeze=False)
    axes = list(axes[0])
    if block:
        ax = axes.pop(0)
        blocks = sorted({h["block"] for h in block})
        for b in blocks:
            ys = [h["loss"] for h in block if h["block"] == b]
            ax.plot(ys, color=plt.cm.viridis(b / max(len(blocks) - 1, 1)), lw=0.8)
        ax.set(title=f"block training, {len(blocks)} blocks (colour: block index)", xlabel="step",
               ylabel="relative MSE", yscale="log")
    if distill:
        ax = axes.pop(0)
        ax.plot(distill, lw=0.8)
        ax.set(title="end-to-end distillation", xlabel="step", ylabel="KL(dense || compressed)")
    return _png(fig)


def loss_png(report: dict[str, Any]) -> bytes:
    """The training KL per step with the held-out KL before and after, as PNG bytes."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4))
    ax.plot(report["loss"], lw=0.8, label="training window KL")
    steps = len(report["loss"])
    ax.scatter([0, steps - 1], [report["held_out_kl_before"], report["held_out_kl_after"]], color="C3", zorder=3,
               label="held-out KL (before, after)")
    ax.set(xlabel="step", ylabel="KL(dense || compressed) per token", yscale="log", title="end-to-end distillation")
    ax.legend()
    return _png(fig)
