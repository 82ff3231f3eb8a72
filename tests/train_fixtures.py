"""Data shared by the training tests: small picture shards and eval sets (S3 lives in s3_server.py)."""
from __future__ import annotations

import contextlib
import io
import json
import os
import signal
import threading
from pathlib import Path
from typing import Iterator

import webdataset as wds
from PIL import Image

from clipforge.train.spec import TrainSpec

COLOURS = {
    "red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220), "yellow": (240, 230, 40),
    "purple": (130, 30, 150), "orange": (250, 140, 20), "white": (250, 250, 250), "black": (10, 10, 10),
}
SHAPES = ["square", "stripe", "dot", "corner"]


def picture(i: int, size: int = 40) -> tuple[bytes, str]:
    """A PNG whose caption says what it shows; colour and shape vary with i, so captions are unique for i < 32."""
    name = list(COLOURS)[i % len(COLOURS)]
    shape = SHAPES[(i // len(COLOURS)) % len(SHAPES)]
    im = Image.new("RGB", (size, size), (128, 128, 128))
    px = im.load()
    c = size // 2
    for y in range(size):
        for x in range(size):
            inside = {"square": size // 5 <= x < size - size // 5 and size // 5 <= y < size - size // 5,
                      "stripe": c - 5 <= y < c + 5, "dot": (x - c) ** 2 + (y - c) ** 2 < 100,
                      "corner": x < c and y < c}[shape]
            if inside:
                px[x, y] = COLOURS[name]
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue(), f"a {name} {shape} number {i}"


def write_shards(folder: Path, sizes: list[int], corrupt: frozenset[int] = frozenset(), first: int = 0,
                 prefix: str = "part") -> list[Path]:
    """Shards of consecutively numbered samples from `first`; samples in `corrupt` get bytes that are not an image."""
    folder.mkdir(parents=True, exist_ok=True)
    paths, i = [], first
    for s, n in enumerate(sizes):
        path = folder / f"{prefix}-{s:05d}.tar"
        with wds.TarWriter(str(path)) as w:
            for _ in range(n):
                png, caption = picture(i)
                w.write({"__key__": f"{i:06d}", "png": b"not an image" if i in corrupt else png, "txt": caption})
                i += 1
        paths.append(path)
    return paths


def truncate(path: Path, keep: float = 0.5) -> None:
    """Cut a file to a share of its length, as a crash mid-write or a partial copy leaves it."""
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def write_eval_sets(root: Path) -> tuple[Path, Path]:
    """A retrieval shard (two captions for some images) and a class-per-folder image tree."""
    shard = root / "retrieval" / "val-00000.tar"
    shard.parent.mkdir(parents=True, exist_ok=True)
    with wds.TarWriter(str(shard)) as w:
        for i in range(10):
            png, caption = picture(i)
            text = caption + ("\n" + caption.replace("a ", "one ", 1) if i % 3 == 0 else "")
            w.write({"__key__": f"{i:06d}", "png": png, "txt": text})
    folder = root / "classes"
    for i in range(12):
        name = list(COLOURS)[i % 3]
        (folder / name).mkdir(parents=True, exist_ok=True)
        (folder / name / f"{i:03d}.png").write_bytes(picture(i + 8 * (i % 2))[0])
    return shard, folder


def train_spec(storage: str, shards: list[str] | None = None, **over) -> TrainSpec:
    """A small training spec of the tiny model; `over` replaces (dicts: updates) top-level sections."""
    raw = {
        "kind": "train", "name": Path(storage).name, "storage": storage,
        "model": {"name": "tiny", "trainable": "all"},
        "data": {"shards": shards, "batch_size": 8, "loader_workers": 0, "shuffle_buffer": 0},
        "optim": {"lr": 2e-3, "warmup_steps": 2, "weight_decay": 0.1},
        "checkpoint": {"every_epochs": 1, "keep_last": 2},
        "log_every_steps": 1, "tensorboard": False, "scaling": {"workers": 2, "cpus_per_worker": 1},
    }
    for k, v in over.items():
        raw[k] = {**raw[k], **v} if isinstance(v, dict) and isinstance(raw.get(k), dict) else v
    return TrainSpec.model_validate(raw)


def read_lines(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def step_lines(lines: list[dict]) -> list[dict]:
    """Training lines (the ones with a loss)."""
    return [m for m in lines if "loss" in m]




def kill_rank_after_step(run: Path, rank: int, after_step: int, killed: dict, stop: threading.Event) -> None:
    """Once metrics.jsonl of `run` passes `after_step`, SIGKILL the process that STORAGE/workers says is `rank`;
    `killed` receives its pid and the step last logged. Run it in a thread; it ends when `stop` is set."""
    from clipforge.train.monitoring import worker_file

    while not stop.wait(0.05):
        try:
            steps = [m["step"] for m in step_lines(read_lines((run / "metrics.jsonl").read_text()))]
            info = json.loads(Path(worker_file(str(run), rank)).read_text())
        except (OSError, ValueError):
            continue  # not written yet, or caught mid-write
        if steps and steps[-1] >= after_step:
            os.kill(info["pid"], signal.SIGKILL)
            killed.update(pid=info["pid"], step=steps[-1])
            return


@contextlib.contextmanager
def killing_rank_after_step(run: Path, rank: int, after_step: int) -> Iterator[dict]:
    """While the block runs a training into `run`, `kill_rank_after_step` watches it from a thread; yields the
    dict that receives the killed pid and step (empty if the kill never happened)."""
    killed: dict = {}
    stop = threading.Event()
    killer = threading.Thread(target=kill_rank_after_step, args=(run, rank, after_step, killed, stop), daemon=True)
    killer.start()
    try:
        yield killed
    finally:
        stop.set()
        killer.join()
