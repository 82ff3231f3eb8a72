"""The demo's report: metrics of the model before and after training, side by side, plus a loss curve."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from clipforge.eval.spec import RETRIEVAL_TASK
from clipforge.runtime.run_dir import read_metrics

RETRIEVAL_KEYS = [f"{d}_retrieval_recall@{k}" for d in ("image", "text") for k in (1, 5, 10)]
ZEROSHOT_KEYS = ["acc1", "acc5", "mean_per_class_recall"]


def _task_metrics(results: list[dict], task: str, keys: list[str]) -> dict[str, float]:
    for r in results:
        if r["task"] == task:
            return {k: float(r["metrics"][k]) for k in keys}
    raise KeyError(f"no `{task}` result among {[r['task'] for r in results]}")


def _counts(results: list[dict], task: str) -> dict[str, Any]:
    for r in results:
        if r["task"] == task:
            return {k: v for k, v in r["metrics"].items() if k.startswith("n_")}
    return {}


def read_losses(train_run: Path) -> list[tuple[int, float]]:
    """(step, loss) of every training line of the run's metrics log."""
    return [(int(rec["step"]), float(rec["loss"])) for rec in read_metrics(str(train_run))
            if "loss" in rec and "step" in rec]


def plot_losses(losses: list[tuple[int, float]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=110)
    ax.plot([s for s, _ in losses], [v for _, v in losses], marker=".", lw=1.2)
    ax.set_xlabel("step")
    ax.set_ylabel("contrastive loss (global batch)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def make_report(untrained: list[dict], trained: list[dict], train_summary: dict, losses: list[tuple[int, float]],
                extra: dict[str, Any]) -> dict[str, Any]:
    def section(results: list[dict], train: dict) -> dict[str, Any]:
        return {
            "retrieval": _task_metrics(results, RETRIEVAL_TASK, RETRIEVAL_KEYS),
            "zeroshot": _task_metrics(results, "zeroshot_classification", ZEROSHOT_KEYS),
            "train": train,
        }

    before = section(untrained, {"steps": 0, "samples_per_second": None, "wall_seconds": 0.0})
    after = section(trained, {k: train_summary.get(k) for k in ("steps", "samples_per_second", "wall_seconds")})
    n_images = _counts(trained, RETRIEVAL_TASK).get("n_images") or 0
    n_classes = _counts(trained, "zeroshot_classification").get("n_classes") or 10
    chance_r1 = 1.0 / n_images if n_images else math.nan
    chance_acc1 = 1.0 / n_classes
    all_keys = [("retrieval", k) for k in RETRIEVAL_KEYS] + [("zeroshot", k) for k in ZEROSHOT_KEYS]
    checks = {
        "trained_beats_untrained_on_every_metric": all(after[s][k] > before[s][k] for s, k in all_keys),
        "text_to_image_r1_over_10x_chance": after["retrieval"]["image_retrieval_recall@1"] >= 10 * chance_r1,
        "zeroshot_acc1_over_1.5x_chance": after["zeroshot"]["acc1"] >= 1.5 * chance_acc1,
        "loss_went_down": bool(losses) and losses[-1][1] < losses[0][1],
    }
    return {
        "untrained": before,
        "trained": after,
        "chance": {"image_retrieval_recall@1": chance_r1, "acc1": chance_acc1},
        "ratios_to_chance": {
            "image_retrieval_recall@1": (after["retrieval"]["image_retrieval_recall@1"] / chance_r1
                                         if n_images else None),
            "acc1": after["zeroshot"]["acc1"] / chance_acc1,
        },
        "checks": checks,
        "loss": {"first": losses[0][1] if losses else None, "last": losses[-1][1] if losses else None,
                 "points": len(losses)},
        **extra,
    }


def format_table(report: dict[str, Any]) -> str:
    rows = [("metric", "untrained", "trained")]
    for sec in ("retrieval", "zeroshot"):
        for k, v in report["trained"][sec].items():
            rows.append((k, f"{report['untrained'][sec][k]:.4f}", f"{v:.4f}"))
    width = max(len(r[0]) for r in rows)
    lines = [f"{a:<{width}}  {b:>9}  {c:>9}" for a, b, c in rows]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines)
