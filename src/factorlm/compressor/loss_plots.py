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
    """The block-training losses (one line per block, start to end) and the distillation curve, as PNG bytes."""
    if not history:
        return None
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    blocks = sorted({h["block"] for h in history if h["stage"] == "block"})
    for b in blocks:
        ys = [h["loss"] for h in history if h["stage"] == "block" and h["block"] == b]
        axes[0].plot(ys, color=plt.cm.viridis(b / max(len(blocks) - 1, 1)), lw=0.8)
    axes[0].set(title="block training (colour: block index)", xlabel="step", ylabel="relative MSE", yscale="log")
    ys = [h["loss"] for h in history if h["stage"] == "distill"]
    if ys:
        axes[1].plot(ys)
    axes[1].set(title="end-to-end distillation", xlabel="step", ylabel="KL(dense || compressed)")
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
