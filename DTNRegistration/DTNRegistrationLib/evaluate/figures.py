"""Figures of ``dtnreg evaluate``: Fig. 3 (Dice per structure, one box per method) and Fig. 2(b) (the alpha sweep).

Drawn from the records alone (plain dicts, as cached), with matplotlib's Agg backend, written atomically.
"""

from __future__ import annotations

import os

import numpy as np

from ..files import atomic_write
from .report import merged_dice


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: str | os.PathLike) -> None:
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100))
    _pyplot().close(fig)


def dice_boxplot(records: list[dict], methods: list[str], table: dict[int, str], path: str | os.PathLike) -> bool:
    """Fig. 3: Dice per structure (left and right merged), one box per method; False when nothing is labelled."""
    per = {m: {} for m in methods}
    order: list[str] = []
    for r in records:
        for name, value in merged_dice(r, table).items():
            per[r["method"]].setdefault(name, []).append(value)
            if name not in order:
                order.append(name)
    if not order:
        return False
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(max(6.0, 0.5 * len(order) * len(methods) + 2), 4.2))
    width = 0.8 / len(methods)
    colours = plt.get_cmap("tab10")
    for i, method in enumerate(methods):
        data = [per[method].get(name, []) for name in order]
        positions = [k + (i - (len(methods) - 1) / 2) * width for k in range(len(order))]
        shown = [(p, d) for p, d in zip(positions, data) if d]
        if not shown:
            continue
        boxes = ax.boxplot(
            [d for _, d in shown],
            positions=[p for p, _ in shown],
            widths=width * 0.9,
            patch_artist=True,
            medianprops={"color": "black"},
        )
        for box in boxes["boxes"]:
            box.set_facecolor(colours(i % 10))
            box.set_alpha(0.75)
        ax.plot([], [], "s", color=colours(i % 10), label=method)
    ax.set_xticks(range(len(order)))
    ax.set_xticklabels(order, rotation=35, ha="right")
    ax.set_ylabel("Dice")
    ax.set_ylim(0, 1)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    ax.set_title("Dice per structure (left and right merged)")
    fig.tight_layout()
    _save(fig, path)
    return True


def alpha_figure(fixed: np.ndarray, sweep: list[dict], path: str | os.PathLike) -> None:
    """Fig. 2(b): the warped moving image for each alpha, voxels with det J <= 0 in red.

    ``fixed`` and each ``sweep`` item's ``warped`` / ``folding`` are LPS-oriented volumes (k, j, i); the axial
    slice shown is the one with the most folding at the smallest alpha (the middle one when nothing folds).
    """
    plt = _pyplot()
    folds = sweep[0]["folding"].reshape(sweep[0]["folding"].shape[0], -1).sum(1)
    k = int(np.argmax(folds)) if folds.any() else fixed.shape[0] // 2
    fig, axes = plt.subplots(1, len(sweep) + 1, figsize=(2.6 * (len(sweep) + 1), 3.2))
    axes[0].imshow(fixed[k], cmap="gray")
    axes[0].set_title("fixed", fontsize=9)
    for ax, item in zip(axes[1:], sweep):
        ax.imshow(item["warped"][k], cmap="gray")
        ys, xs = np.nonzero(item["folding"][k])
        ax.scatter(xs, ys, s=3, c="red", marker="s", linewidths=0)
        ax.set_title(f"alpha={item['alpha']:g}\n|J|<=0: {item['folding_count']} voxels", fontsize=9)
    for ax in axes:
        ax.axis("off")
    fig.suptitle(f"Warped moving image, folding voxels in red (axial slice {k})", fontsize=10)
    fig.tight_layout()
    _save(fig, path)


__all__ = ["alpha_figure", "dice_boxplot"]
