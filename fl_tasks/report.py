"""The convergence plot: promotion metric per round, for the global model and for every silo."""

from __future__ import annotations

from pathlib import Path

from fl_tasks.records import Evaluation, RegistrySummary
from fl_tasks.store import JobKeys, Store


def history(store: Store, keys: JobKeys, upto_round: int) -> list[dict]:
    """Per committed round: the federated value and each silo's evaluation of the global model."""
    rows = []
    for r in range(1, upto_round + 1):
        summary = store.get_record_or_none(keys.registry(r), RegistrySummary)
        if summary is None or summary.promotion_value is None:  # None: registered late, never evaluated
            continue
        metric = summary.promotion_metric
        silos = {}
        for name in [*summary.accepted, *summary.rejected]:
            ev = store.get_record_or_none(keys.evaluation(r, name), Evaluation)
            if ev and metric in ev.metrics:
                silos[name] = ev.metrics[metric]
        rows.append({"round": r, "metric": metric, "global": summary.promotion_value, "silos": silos})
    return rows


def convergence_plot(rows: list[dict], job: str, out_path: str | Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    rounds = [row["round"] for row in rows]
    silo_names = sorted({name for row in rows for name in row["silos"]})
    for name in silo_names:
        points = [(row["round"], row["silos"][name]) for row in rows if name in row["silos"]]
        ax.plot(*zip(*points, strict=True), marker=".", linewidth=1, alpha=0.7, label=f"silo {name}")
    ax.plot(rounds, [row["global"] for row in rows], marker="o", linewidth=2.5, color="black", label="federated")
    metric = rows[-1]["metric"] if rows else "metric"
    ax.set(title=f"{job}: {metric} of the global model per round", xlabel="round", ylabel=metric)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # rounds are whole numbers
    ax.grid(alpha=0.3)
    ax.legend(loc="best", fontsize=8)
    fig.tight_layout()
    fig.savefig(out_path)
    plt.close(fig)
    return Path(out_path)
