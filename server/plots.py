"""PNG plots of a run (matplotlib, headless Agg backend)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def _finish(fig, axes, path: Path, legend_columns: int = 1) -> Path:
    """Grid and legend on every panel, then save the PNG and free the figure."""
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, ncol=legend_columns)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_accuracy_per_width(rounds: list[dict[str, Any]], widths: list[str], path: Path) -> Path:
    """Clean accuracy (λ = 0) of every width over rounds."""
    fig, ax = plt.subplots(figsize=(7, 4.5))
    cmap = plt.get_cmap("viridis")
    for i, w in enumerate(widths):
        xs = [r["round"] for r in rounds if f"acc-w{w}-l0.0" in r]
        ys = [r[f"acc-w{w}-l0.0"] for r in rounds if f"acc-w{w}-l0.0" in r]
        ax.plot(xs, ys, label=f"width {w}", color=cmap(i / max(len(widths) - 1, 1)))
    ax.set(xlabel="round", ylabel="test accuracy (λ = 0)", title="accuracy per width")
    return _finish(fig, [ax], path, legend_columns=2)


def plot_robustness(summary: dict[str, Any], path: Path) -> Path:
    """Standard vs robust accuracy per width, one line per robustness λ."""
    widths = list(summary["widths"])
    xs = [float(w) for w in widths]
    lambdas = list(summary["widths"][widths[0]]["by_lambda"])
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    for lam in lambdas:
        sa = [summary["widths"][w]["by_lambda"][lam]["accuracy"] for w in widths]
        ra = [summary["widths"][w]["by_lambda"][lam].get("robust_accuracy") for w in widths]
        axes[0].plot(xs, sa, marker="o", label=f"λ = {lam}")
        if all(v is not None for v in ra):
            axes[1].plot(xs, ra, marker="o", label=f"λ = {lam}")
    axes[0].set(xlabel="width", ylabel="accuracy", title="standard accuracy")
    axes[1].set(xlabel="width", title="robust accuracy (PGD L∞)")
    return _finish(fig, axes, path)


def plot_accuracy_vs_width(comparison: dict[str, Any], widths: list[str], path: Path) -> Path:
    """Mean test accuracy per width with ±1 std error bars, one line per method."""
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for method, result in comparison.items():
        ws = [w for w in widths if w in result["accuracy"]]
        ax.errorbar(
            [float(w) for w in ws],
            [result["accuracy"][w]["mean"] for w in ws],
            yerr=[result["accuracy"][w]["std"] for w in ws],
            marker="o",
            capsize=3,
            label=method,
        )
    ax.set(xlabel="width", ylabel="test accuracy (λ = 0)", title="accuracy per width (mean ± std over seeds)")
    return _finish(fig, [ax], path)


def plot_accuracy_vs_bytes(comparison: dict[str, Any], path: Path) -> Path:
    """Accuracy of each method's widest model against the bytes clients upload per round."""
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for method, result in comparison.items():
        widest = max(result["accuracy"], key=float)
        acc = result["accuracy"][widest]
        ax.errorbar(result["upload_bytes_per_round"] / 1e6, acc["mean"], yerr=acc["std"], marker="o", capsize=3, label=f"{method} (width {widest})")
    ax.set(xlabel="upload per round (MB)", ylabel="test accuracy (λ = 0)", title="accuracy vs communication")
    return _finish(fig, [ax], path)


def plot_patch_similarity(comparison: dict, path: Path) -> None:
    """Mean pairwise cosine similarity of patch tokens after each block, one line per ViT method
    (over-smoothing shows as lines rising towards 1 with depth)."""
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    for method, c in comparison.items():
        if "patch_similarity" in c:
            values = c["patch_similarity"]
            ax.plot(range(1, len(values) + 1), values, marker="o", markersize=3, label=method)
    ax.set_xlabel("block")
    ax.set_ylabel("patch-token cosine similarity")
    ax.set_title("over-smoothing (width 1, test images)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
