"""Figures of ``polar-analyze rft``: the fall of the true KL per reward model, and the curves."""

from __future__ import annotations

from pathlib import Path

import matplotlib.pyplot as plt

from analysis.plots import save
from analysis.rft import CONTROLS


def plot_rft(summary: dict, out: Path) -> list[Path]:
    """rft_fall (final fall against the RM's parameters, controls as lines) and rft_curves
    (mean fall against the RFT step, one line per arm); returns the files written."""
    files = []
    trained = [a for a in summary["arms"] if a["reward_mode"] == "rm" and a["rm_params"]]
    if trained:
        fig, ax = plt.subplots(figsize=(5.5, 4))
        for a in trained:
            ax.errorbar(a["rm_params"], 100 * a["fall_mean"],
                        yerr=100 * (a["fall_sd"] or 0.0), fmt="o", capsize=3, label=a["arm"])
        for a in summary["arms"]:
            if a["reward_mode"] in CONTROLS:
                ax.axhline(100 * a["fall_mean"], ls="--", lw=1, color="grey")
                ax.annotate(a["arm"], (0.01, 100 * a["fall_mean"]), xycoords=("axes fraction",
                            "data"), fontsize=7, color="grey", va="bottom")
        ax.axhline(0, color="black", lw=0.5)
        ax.set_xscale("log")
        ax.set_xlabel("reward model parameters")
        ax.set_ylabel("fall of the true KL to the target (%)")
        ax.legend(fontsize=7)
        fig.tight_layout()
        files += save(fig, out / "rft_fall")
    fig, ax = plt.subplots(figsize=(5.5, 4))
    for a in summary["arms"]:
        curve = a["curve"]
        ax.plot(curve["step"], [100 * f for f in curve["true_kl_fall"]], marker=".",
                ls="--" if a["reward_mode"] in CONTROLS else "-", label=a["arm"])
    ax.axhline(0, color="black", lw=0.5)
    ax.set_xlabel("RFT step")
    ax.set_ylabel("fall of the true KL to the target (%), mean over seeds")
    ax.legend(fontsize=7)
    fig.tight_layout()
    files += save(fig, out / "rft_curves")
    return files
