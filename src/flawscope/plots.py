"""The report's charts, drawn with matplotlib from saved scores (no model needed).

Each function takes plain data and returns PNG bytes, so the report can embed them and tests
can call them without a results folder.
"""

from __future__ import annotations

import io

import matplotlib

matplotlib.use("Agg")  # headless: CI and inspection PCs have no display

import numpy as np  # noqa: E402
from matplotlib import pyplot as plt  # noqa: E402
from sklearn.metrics import precision_recall_curve, roc_curve  # noqa: E402

#: One colour per model, in benchmark order, the same on every chart of the report.
PALETTE = plt.get_cmap("tab10").colors


def colour(i: int):
    return PALETTE[i % len(PALETTE)]


def hex_colour(i: int) -> str:
    """The same colour as CSS, for the report's swatches."""
    return "#" + "".join(f"{round(255 * c):02x}" for c in colour(i))


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def _has_both(labels: np.ndarray) -> bool:
    return labels.size > 0 and labels.min() != labels.max()


def roc_plot(curves: list[tuple[str, np.ndarray, np.ndarray, float | None]],
             title: str) -> bytes:
    """ROC curves of several models: ``(name, labels, scores, auroc)`` each."""
    fig, ax = plt.subplots(figsize=(4.6, 4.2))
    ax.plot([0, 1], [0, 1], color="0.75", lw=1, ls=":", label="chance")
    for i, (name, labels, scores, auc) in enumerate(curves):
        if not _has_both(labels):
            continue
        fpr, tpr, _ = roc_curve(labels, scores)
        ax.plot(fpr, tpr, color=colour(i), lw=1.8,
                label=f"{name} (AUROC {auc:.3f})" if auc is not None else name)
    ax.set(xlabel="false-positive rate (good flagged)",
           ylabel="true-positive rate (defects caught)", title=title, xlim=(-0.01, 1.01),
           ylim=(-0.01, 1.01))
    ax.legend(loc="lower right", fontsize=8)
    ax.grid(alpha=0.3)
    return _png(fig)


def pr_plot(curves: list[tuple[str, np.ndarray, np.ndarray, float | None]],
            title: str) -> bytes:
    """Precision-recall curves of several models: ``(name, labels, scores, ap)`` each."""
    fig, ax = plt.subplots(figsize=(4.6, 4.2))
    chance_drawn = False
    for i, (name, labels, scores, ap) in enumerate(curves):
        if not _has_both(labels):
            continue
        precision, recall, _ = precision_recall_curve(labels, scores)
        ax.plot(recall, precision, color=colour(i), lw=1.8,
                label=f"{name} (AP {ap:.3f})" if ap is not None else name)
        if not chance_drawn:  # same test set for every model: one chance line
            base = float(np.mean(labels))
            ax.axhline(base, color="0.75", lw=1, ls=":", label=f"chance ({base:.2f})")
            chance_drawn = True
    ax.set(xlabel="recall (defects caught)", ylabel="precision (flagged that are defective)",
           title=title, xlim=(-0.01, 1.01), ylim=(-0.01, 1.03))
    ax.legend(loc="lower left", fontsize=8)
    ax.grid(alpha=0.3)
    return _png(fig)


def score_histogram(labels: np.ndarray, scores: np.ndarray, f1_threshold: float | None,
                    title: str, colour_index: int = 0,
                    decision_threshold: float | None = None) -> bytes:
    """Scores of good vs defective test images, with the F1-max threshold drawn (the best
    possible cut, known only with labels) and, if the model has one, its own decision
    threshold set from good images only (what it will use in production)."""
    labels = np.asarray(labels)
    scores = np.asarray(scores, dtype=np.float64)
    fig, ax = plt.subplots(figsize=(4.6, 3.2))
    finite = scores[np.isfinite(scores)]
    lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
    bins = np.linspace(lo, hi if hi > lo else lo + 1e-9, 31)
    ax.hist(scores[labels == 0], bins=bins, color="tab:green", alpha=0.55,
            label=f"good ({int((labels == 0).sum())})")
    ax.hist(scores[labels == 1], bins=bins, color="tab:red", alpha=0.55,
            label=f"defective ({int((labels == 1).sum())})")
    if f1_threshold is not None:
        ax.axvline(f1_threshold, color="k", ls="--", lw=1.3,
                   label=f"F1-max threshold {f1_threshold:.4g}")
    if decision_threshold is not None:
        ax.axvline(decision_threshold, color="tab:purple", ls=":", lw=1.6,
                   label=f"model's threshold {decision_threshold:.4g}")
    ax.set(xlabel="anomaly score", ylabel="test images", title=title)
    for spine in ("top", "right"):
        ax.spines[spine].set_visible(False)
    ax.spines["left"].set_color(colour(colour_index))
    ax.legend(fontsize=8)
    return _png(fig)


def defect_bars(defect_types: list[str], models: list[str],
                values: dict[str, dict[str, float | None]], title: str) -> bytes:
    """Grouped bars: image AUROC per defect type (groups) and model (bars)."""
    fig, ax = plt.subplots(figsize=(max(4.6, 1.0 + 0.9 * len(defect_types) * max(1, len(models))
                                        / 2), 3.4))
    width = 0.8 / max(1, len(models))
    x = np.arange(len(defect_types))
    for i, model in enumerate(models):
        heights = [values.get(model, {}).get(t) for t in defect_types]
        ax.bar(x + (i - (len(models) - 1) / 2) * width,
               [np.nan if h is None else h for h in heights], width, color=colour(i),
               label=model)
    ax.axhline(0.5, color="0.6", lw=1, ls=":")
    pad = max(0.0, (3 - len(defect_types)) / 2)  # one or two types: bars keep a sane width
    ax.set_xlim(-0.5 - pad, len(defect_types) - 0.5 + pad)
    ax.set_xticks(x, defect_types, rotation=20, ha="right")
    ax.set(ylabel="image AUROC", ylim=(0, 1.05), title=title)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))  # never over a bar
    ax.grid(axis="y", alpha=0.3)
    return _png(fig)
