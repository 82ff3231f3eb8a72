"""Typed settings of the monitoring dashboard (`clipforge dashboard`)."""
from __future__ import annotations

from pydantic import Field

from clipforge.specbase import Spec


class DashboardSpec(Spec):
    runs: str = Field(..., description="Folder of run directories (local path or fsspec URL such as s3://bucket/runs).")
    host: str = Field("127.0.0.1", description="Address to bind. The default serves this machine only.")
    port: int = Field(8050, ge=0, le=65535, description="TCP port (0 picks a free one).")
    max_depth: int = Field(
        4, ge=0, le=16, description="How many folder levels below `runs` are searched for run directories."
    )
    running_window_s: float = Field(
        120.0, gt=0, description="A run whose metrics.jsonl changed within this many seconds counts as running."
    )
    rescan_interval_s: float = Field(
        1.0, ge=0, description="Requests within this many seconds of a folder scan reuse its result."
    )
    estimate_compute: bool = Field(
        True,
        description="Estimate parameters and GMACs of models named in run specs (built once per model, in the "
        "background) when a run's summary.json does not record them.",
    )
    enable_try: bool = Field(True, description="Serve the 'try it' page (loads checkpoints on demand).")
    max_upload_mb: float = Field(16.0, gt=0, description="Largest image accepted by the 'try it' page.")
