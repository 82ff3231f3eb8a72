# Started by benchmarks/train_throughput.py under torchrun, inside open_clip's own training venv:
#   torchrun --standalone --nproc_per_node 2 benchmarks/openclip_train_entry.py CONFIG_DIR STEPS_JSONL ARGS_JSON
"""open_clip's trainer (`open_clip_train.main`) on a model config that lives outside open_clip's registry.

Registers the JSON configs of CONFIG_DIR with open_clip, records every `Train Epoch` log line of rank 0
with its exact time (the log format itself only has whole seconds) into STEPS_JSONL, then runs
`open_clip_train.main.main` on the argument list in ARGS_JSON (a file: torchrun's own parser would take
open_clip's `--logs` for an abbreviation of its `--logs-specs`). Imports only open_clip's venv, never clipforge.

One compatibility fix, nothing else changed: open_clip_train wraps the model as
`DistributedDataParallel(model, device_ids=[device])` whatever the device, and current torch refuses
device_ids for a CPU module; for CPU devices the wrapper gets device_ids=None, which is what DDP expects
there (the same wrapping clipforge does on CPU).
"""
from __future__ import annotations

import json
import logging
import os
import sys


class StepLines(logging.Handler):
    """Appends {"time": ..., "message": ...} for each per-step line of the trainer's log."""

    def __init__(self, path: str):
        super().__init__(level=logging.INFO)
        self.out = open(path, "a", encoding="utf-8")

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if message.startswith("Train Epoch:"):
            self.out.write(json.dumps({"time": record.created, "message": message}) + "\n")
            self.out.flush()


def allow_cpu_device_ids() -> None:
    """Make torch.nn.parallel.DistributedDataParallel accept device_ids=[cpu] by dropping it (CPU modules take None)."""
    import torch
    import torch.nn.parallel

    ddp = torch.nn.parallel.DistributedDataParallel

    class CpuTolerantDDP(ddp):
        def __init__(self, module, device_ids=None, *args, **kwargs):
            if device_ids and all(torch.device(d).type == "cpu" for d in device_ids):
                device_ids = None
            super().__init__(module, device_ids, *args, **kwargs)

    torch.nn.parallel.DistributedDataParallel = CpuTolerantDDP


def main() -> int:
    if len(sys.argv) != 4:
        print("usage: openclip_train_entry.py CONFIG_DIR STEPS_JSONL ARGS_JSON", file=sys.stderr)
        return 2
    config_dir, steps_path = sys.argv[1], sys.argv[2]
    with open(sys.argv[3], encoding="utf-8") as f:
        argv = json.load(f)
    if not isinstance(argv, list) or not all(isinstance(a, str) for a in argv):
        print(f"{sys.argv[3]}: expected a JSON list of argument strings", file=sys.stderr)
        return 2
    import open_clip
    from open_clip_train.main import main as openclip_main

    open_clip.add_model_config(config_dir)
    allow_cpu_device_ids()
    if os.environ.get("RANK", "0") == "0":
        logging.getLogger().addHandler(StepLines(steps_path))
    result = openclip_main(argv)
    return 0 if result is None else int(result)


if __name__ == "__main__":
    sys.exit(main())
