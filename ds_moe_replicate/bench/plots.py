"""Plots of a benchmark run (matplotlib, Agg backend: no display needed).

Legend: L layers.
"""

from __future__ import annotations

import os
from typing import Dict, List

__all__ = ["plot_balancedness", "plot_times"]


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_balancedness(modes: Dict[str, Dict], path: str) -> str:
    """One panel per MoE layer: balancedness (mean / max tokens per rank) per timed step, a line per mode."""
    plt = _pyplot()
    L = max(len(m["balancedness_per_step_layer"][0]) for m in modes.values() if m["balancedness_per_step_layer"])
    fig, axes = plt.subplots(1, L, figsize=(2.6 * L + 1, 2.6), sharey=True, squeeze=False)
    for name, m in modes.items():
        steps = m["balancedness_per_step_layer"]
        for j in range(L):
            axes[0][j].plot(range(len(steps)), [s[j] for s in steps], marker=".", label=name, linewidth=1)
    for j in range(L):
        axes[0][j].set_title(f"MoE layer {j}", fontsize=9)
        axes[0][j].set_xlabel("timed step", fontsize=8)
        axes[0][j].set_ylim(0, 1.05)
    axes[0][0].set_ylabel("balancedness", fontsize=8)
    axes[0][-1].legend(fontsize=6, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


def plot_times(modes: Dict[str, Dict], path: str, title: str = "") -> str:
    """Median ms per forward per mode, with the p10-p90 range as error bars."""
    plt = _pyplot()
    names: List[str] = list(modes)
    med = [modes[n]["ms_median"] for n in names]
    lo = [modes[n]["ms_median"] - modes[n]["ms_p10"] for n in names]
    hi = [modes[n]["ms_p90"] - modes[n]["ms_median"] for n in names]
    fig, ax = plt.subplots(figsize=(1.0 * len(names) + 2, 3))
    ax.bar(range(len(names)), med, yerr=[lo, hi], capsize=3, color="tab:blue")
    ax.set_xticks(range(len(names)))
    ax.set_xticklabels(names, rotation=30, ha="right", fontsize=7)
    ax.set_ylabel("ms / forward (median)", fontsize=8)
    if title:
        ax.set_title(title, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return os.fspath(path)
