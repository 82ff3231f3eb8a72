"""`clipforge demo`: real offline data -> loopback HTTP -> build -> train -> eval -> OUT/report.json.

Every stage runs from a spec written to OUT/specs/, exactly as `clipforge run` would run it.
"""
from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

from clipforge.demo import demo_specs
from clipforge.demo.demo_report import format_table, make_report, plot_losses, read_losses
from clipforge.runtime.output_folder import OutputOwner, claim_output_folder
from clipforge.specbase import USER_SPEC, Spec

log = logging.getLogger(__name__)


@dataclass
class DemoOptions:
    out: Path = Path("runs/demo")
    data_cache: Path = Path("data/cache")
    tiny: bool = False
    seed: int = 0


def _spec(raw: dict, path: Path):
    """Validate a spec dict as its kind's spec, as `clipforge run` would, and keep a copy as YAML beside the run
    (the user can re-run it by hand)."""
    from clipforge.eval.spec import EvalSpec
    from clipforge.pipeline.spec import BuildSpec
    from clipforge.train.spec import TrainSpec

    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    kinds: dict[str, type[Spec]] = {"build": BuildSpec, "train": TrainSpec, "eval": EvalSpec}
    return kinds[raw["kind"]].model_validate(raw, context=USER_SPEC)


# What the demo writes at the top of its folder.
DEMO_ENTRIES = ("data", "lists", "shards", "specs", "eval", "train", "report.json", "loss.png")


def run_demo(opts: DemoOptions) -> Path:
    from clipforge.demo.http_server import serve_directory
    from clipforge.demo.offline_data import prepare_demo_data, write_url_list
    from clipforge.eval.evaluator import run_eval
    from clipforge.pipeline.build import run_build
    from clipforge.runtime.ray_session import ray_session
    from clipforge.train.trainer import run_train

    t0 = time.time()
    size = demo_specs.TINY if opts.tiny else demo_specs.FULL
    out = opts.out.resolve()
    # A tiny and a full demo in one folder would resume each other's runs (different models): one owner per folder.
    owner = OutputOwner("demo", "demo-tiny" if opts.tiny else "demo", "--out", own_names=DEMO_ENTRIES,
                        signature=("specs",))
    claim_output_folder(str(out), owner)
    timings: dict[str, float] = {}
    stage_start = time.time()

    def stage(name: str):
        nonlocal stage_start
        timings[name] = round(time.time() - stage_start, 2)
        stage_start = time.time()
        log.info("demo: %s done in %.1f s", name, timings[name])

    data = prepare_demo_data(opts.data_cache.resolve(), out / "data", max_train=size.max_train,
                             heldout=size.heldout, fashion_per_class=size.fashion_per_class, seed=opts.seed)
    stage("data")

    with ray_session():
        with serve_directory(data.images_dir) as base_url:
            lists = out / "lists"
            train_urls = write_url_list(data.train_list, base_url, lists / "train_urls.parquet")
            heldout_urls = write_url_list(data.heldout_list, base_url, lists / "heldout_urls.parquet")
            shards = out / "shards"
            build_stats = {}
            for name, urls in (("train", train_urls), ("heldout", heldout_urls)):
                spec = _spec(demo_specs.build_spec(f"demo-build-{name}", urls, shards / name, size),
                             out / "specs" / f"build_{name}.yaml")
                build_stats[name] = run_build(spec)
        stage("build")

        def evaluate(label: str, checkpoint: str | None):
            raw = demo_specs.eval_spec(f"demo-eval-{label}", out / "eval" / label, size.model, checkpoint, label,
                                       shards / "heldout", data.fashion_dir, data.fashion_classnames)
            return run_eval(_spec(raw, out / "specs" / f"eval_{label}.yaml"))

        untrained = evaluate("untrained", None)
        stage("eval_untrained")
        train_dir = out / "train"
        train_summary = run_train(_spec(demo_specs.train_spec(train_dir, shards / "train", size),
                                        out / "specs" / "train.yaml"))
        stage("train")
        trained = evaluate("trained", str(train_dir))
        stage("eval_trained")

    losses = read_losses(train_dir)
    plot_losses(losses, out / "loss.png", f"clipforge demo: {size.model} ({size.trainable})")
    report = make_report(untrained, trained, train_summary, losses, extra={
        "model": size.model,
        "trainable": size.trainable,
        "tiny": opts.tiny,
        "data": data.counts,
        "licenses": data.licenses,
        "build": {k: {kk: v.get(kk) for kk in ("total", "ok", "status_counts", "images_per_second", "wall_seconds")}
                  for k, v in build_stats.items()},
        "stage_seconds": timings,
        "wall_seconds_total": round(time.time() - t0, 2),
        "outputs": {"train_run": str(train_dir), "shards": str(shards), "specs": str(out / "specs"),
                    "loss_curve": str(out / "loss.png")},
    })
    report_path = out / "report.json"
    report_path.write_text(json.dumps(report, indent=2))
    print(format_table(report))
    print(json.dumps(report["checks"], indent=2))
    return report_path
