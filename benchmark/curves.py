"""Training curves of one run: the per-step loss of every stage on one step axis (``plots/losses/``).

Drawn from the run record's ``stages[].loss_curve`` (and ``aux_loss_curve``, a second panel, for a method
with an auxiliary loss); a record made before the curves were kept has none, and gets no figure.
"""

from __future__ import annotations

from matplotlib.figure import Figure

from benchmark.records import RunRecord


def loss_figure(rec: RunRecord) -> Figure | None:
    """Loss against the optimiser step, stage by stage (boundaries dashed); None without any curve."""
    stages = [s for s in rec.stages if s.loss_curve]
    if not stages:
        return None
    aux = any(s.aux_loss_curve for s in stages)
    fig = Figure(figsize=(7.5, 4.6 if aux else 3.4))
    axes = fig.subplots(2 if aux else 1, 1, sharex=True, squeeze=False)[:, 0]
    offset = 0
    for n, s in enumerate(stages):
        panels = [(axes[0], s.loss_curve)] + ([(axes[1], s.aux_loss_curve)] if aux and s.aux_loss_curve else [])
        for ax, curve in panels:
            ax.plot([offset + p[0] for p in curve], [p[1] for p in curve], lw=1.2, label=f"stage {s.stage}: {s.task}")
        offset += s.steps or int(s.loss_curve[-1][0])
        for ax in axes if n < len(stages) - 1 else []:  # a boundary between two stages
            ax.axvline(offset + 0.5, color="0.6", ls="--", lw=0.8)
    axes[0].set_ylabel("training loss (LM + aux)")
    if aux:
        axes[1].set_ylabel("auxiliary loss")
    axes[-1].set_xlabel("optimiser step (over the whole run)")
    axes[0].legend(fontsize=8, loc="upper right")
    for ax in axes:
        ax.grid(alpha=0.3)
    status = "" if rec.status == "success" else f" [{rec.status}]"
    axes[0].set_title(f"{rec.run_id}{status}", fontsize=10)
    fig.tight_layout()
    return fig
