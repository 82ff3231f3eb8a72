"""The demo's job specs, as plain data: the same YAML a user would write.

They are written to OUT/specs/*.yaml so each stage can be re-run by hand with
`clipforge run OUT/specs/STAGE.yaml` (the build specs need the demo's HTTP server running).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class DemoSize:
    """How big the demo is: the full demo fits ~15 min on 2 cores, the tiny one a few minutes."""

    max_train: int
    heldout: int
    fashion_per_class: int
    model: str
    trainable: str
    image_size: int
    batch_size: int
    epochs: int
    lr: float
    warmup_steps: int
    samples_per_shard: int


FULL = DemoSize(max_train=4500, heldout=300, fashion_per_class=100, model="miniclip-effnet-minilm",
                trainable="heads", image_size=224, batch_size=256, epochs=40, lr=2e-3, warmup_steps=20,
                samples_per_shard=1000)
TINY = DemoSize(max_train=200, heldout=40, fashion_per_class=5, model="tiny", trainable="all",
                image_size=64, batch_size=32, epochs=6, lr=2e-3, warmup_steps=3, samples_per_shard=100)


def build_spec(name: str, url_list: Path, out: Path, size: DemoSize) -> dict:
    return {
        "kind": "build",
        "name": name,
        "input": {"path": str(url_list), "url_col": "url", "caption_col": "caption", "extra_cols": ["source"]},
        "output": {"path": str(out), "samples_per_shard": size.samples_per_shard, "image_format": "jpg"},
        # The demo's images are served from 127.0.0.1: loopback, and only loopback, is allowed explicitly.
        "download": {"allow_networks": ["127.0.0.0/8"], "threads_per_worker": 16, "timeout_s": 10, "retries": 1},
        "resize": {"size": size.image_size, "mode": "border"},
        "scaling": {"workers": 2, "cpus_per_worker": 0.5},
    }


def train_spec(run_dir: Path, shards: Path, size: DemoSize) -> dict:
    return {
        "kind": "train",
        "name": "demo-train",
        "storage": str(run_dir),
        "model": {"name": size.model, "trainable": size.trainable},
        "data": {"shards": [str(shards)], "batch_size": size.batch_size, "loader_workers": 0,
                 "shuffle_buffer": 1000},
        "optim": {"lr": size.lr, "weight_decay": 0.1, "warmup_steps": size.warmup_steps, "epochs": size.epochs},
        "loss": {"kind": "clip", "local_loss": True, "gather_with_grad": True},
        "checkpoint": {"every_epochs": max(1, size.epochs // 2), "keep_last": 2},
        "log_every_steps": 5,
        "scaling": {"workers": 2, "cpus_per_worker": 1},
    }


def eval_spec(name: str, out: Path, model: str, checkpoint: str | None, label: str, heldout_shards: Path,
              fashion_dir: Path, classnames: list[str]) -> dict:
    return {
        "kind": "eval",
        "name": name,
        "storage": str(out),
        "model": {"name": model, "checkpoint": checkpoint},
        "model_label": label,
        "tasks": [
            {"task": "zeroshot_retrieval", "dataset": "tuxpaint_heldout", "shards": [str(heldout_shards)]},
            {"task": "zeroshot_classification", "dataset": "fashion_mnist", "image_folder": str(fashion_dir),
             "classnames": classnames, "templates": "fashion_mnist"},
        ],
        "batch_size": 32,
        # Shared by the before/after evals: heads-only training leaves the towers frozen, so the second
        # eval reuses the first one's tower features instead of embedding everything again.
        "cache": str(out.parent / "cache"),
        "scaling": {"workers": 2, "cpus_per_worker": 0.5},
    }
