"""The dashboard's JSON API, independent of the HTTP server: each method returns (status, payload).

Every path a request names (run ids, checkpoint ids) is checked three ways before anything is read:
its syntax (`clean_relpath`), where it resolves to (`RunTree.check_inside`, symlinks included), and
membership in the set of runs the folder scan found.
"""
from __future__ import annotations

import logging
import math
import time
from typing import TYPE_CHECKING

from clipforge.dashboard.compare_view import compare_payload
from clipforge.dashboard.details import list_checkpoints, read_metrics, run_dir, run_payload
from clipforge.dashboard.evals import key_parts
from clipforge.dashboard.model_cost import ModelCosts
from clipforge.dashboard.runs import RunIndex
from clipforge.dashboard.scaling import DEFAULT_BINS_PER_DECADE
from clipforge.dashboard.scaling_view import scaling_payload
from clipforge.dashboard.spec import DashboardSpec
from clipforge.dashboard.sweep_view import sweep_payload
from clipforge.dashboard.sweeps import swept_fields
from clipforge.dashboard.tree import PathNotFound, PathRefused, clean_relpath, open_tree
from clipforge.runtime.run_dir import CHECKPOINTS_DIR, SWEEP_FILE

if TYPE_CHECKING:
    from clipforge.dashboard.tryit import Predictor

log = logging.getLogger(__name__)

Response = tuple[int, dict]
MAX_COMPARED = 50  # runs on the compare page at once


class BadRequest(ValueError):
    """A parameter is missing or malformed."""


def _int_param(params: dict[str, str], name: str, default: int, lo: int, hi: int) -> int:
    raw = params.get(name)
    if raw in (None, ""):
        return default
    try:
        value = int(raw)
    except ValueError:
        raise BadRequest(f"parameter {name!r} must be an integer, got {raw!r}") from None
    if not lo <= value <= hi:
        raise BadRequest(f"parameter {name!r} must be between {lo} and {hi}, got {value}")
    return value


def _float_param(params: dict[str, str], name: str) -> float | None:
    raw = params.get(name)
    if raw in (None, ""):
        return None
    try:
        value = float(raw)
    except ValueError:
        raise BadRequest(f"parameter {name!r} must be a number, got {raw!r}") from None
    if not math.isfinite(value):
        raise BadRequest(f"parameter {name!r} must be finite")
    return value


def error(status: int, message: str) -> Response:
    return status, {"error": message}


def group_list(groups: dict) -> list[dict]:
    """The folders that hold runs, by id; `sweep` tells a sweep (with sweep.json) from a plain folder."""
    return [{"id": g.id, "runs": len(g.runs), "sweep": g.sweep is not None, "fields": swept_fields(g.sweep or {})}
            for g in sorted(groups.values(), key=lambda g: g.id) if g.runs]


class Dashboard:
    def __init__(self, spec: DashboardSpec, costs: ModelCosts | None = None):
        self.spec = spec
        self.tree = open_tree(spec.runs)
        self.costs = costs or ModelCosts(enabled=spec.estimate_compute)
        self.index = RunIndex(self.tree, spec, self.costs)
        self._predictor: Predictor | None = None  # built on the first "try it" request

    # -- request checks -------------------------------------------------------------------------

    def _known_run(self, raw_id: str | None) -> tuple[str, dict]:
        """The run id (checked) and its current row."""
        if raw_id is None:
            raise BadRequest("parameter 'id' is required")
        rel = clean_relpath(raw_id)
        self.tree.check_inside(rel)
        row = self.index.row(rel)
        if row is None:
            raise PathNotFound(f"{rel or '(root)'} is not a run directory")
        return rel, row

    def handle(self, endpoint, *args) -> Response:
        """Run an endpoint, turning refused paths, missing runs and bad parameters into 403/404/400."""
        try:
            status, payload = endpoint(*args)
        except PathRefused as e:
            return error(403, str(e))
        except PathNotFound as e:
            return error(404, str(e))
        except BadRequest as e:
            return error(400, str(e))
        if status == 200:
            payload.setdefault("root", self.tree.url)
        return status, payload

    # -- endpoints ------------------------------------------------------------------------------

    def runs(self, params: dict[str, str]) -> Response:
        rows, groups = self.index.scan()
        metrics = sorted({k for r in rows for k in r["evals"]})
        return 200, {
            "now": time.time(),
            "runs": rows,
            "groups": group_list(groups),
            "metrics": metrics,
            "metric_parts": {k: key_parts(k) for k in metrics},
            "estimates_pending": self.costs.pending(),
            "estimate_errors": self.costs.errors(),
        }

    def run(self, params: dict[str, str]) -> Response:
        rel, row = self._known_run(params.get("id"))
        return 200, run_payload(self.tree, run_dir(self.tree, rel), row)

    def metrics(self, params: dict[str, str]) -> Response:
        rel, row = self._known_run(params.get("id"))
        offset = _int_param(params, "offset", 0, 0, 2**62)
        chunk, reset = read_metrics(self.tree, run_dir(self.tree, rel), offset)
        return 200, {"id": rel, "records": chunk.records, "offset": chunk.offset, "skipped_lines": chunk.skipped,
                     "reset": reset, "row": row}

    def compare(self, params: dict[str, str]) -> Response:
        """The final eval metrics of the runs named in `ids` (comma-separated), side by side."""
        raw = params.get("ids")
        if not raw:
            raise BadRequest("parameter 'ids' is required: run ids separated by commas")
        ids = list(dict.fromkeys(i for i in raw.split(",") if i))
        if len(ids) > MAX_COMPARED:
            raise BadRequest(f"parameter 'ids' names {len(ids)} runs; compare at most {MAX_COMPARED}")
        rows = [self._known_run(i)[1] for i in ids]
        return 200, compare_payload(rows)

    def sweep(self, params: dict[str, str]) -> Response:
        """A sweep's children: swept values against final metrics (404 for a folder without sweep.json)."""
        raw = params.get("id")
        if raw is None:
            raise BadRequest("parameter 'id' is required")
        rel = clean_relpath(raw)
        self.tree.check_inside(rel)
        rows, groups = self.index.scan()
        group = groups.get(rel)
        if group is None or group.sweep is None:
            raise PathNotFound(f"{rel or '(root)'} is not a sweep: it holds no {SWEEP_FILE} (written by "
                               "`clipforge run` of a `kind: sweep` spec)")
        return 200, sweep_payload(rel, group.sweep, rows)

    def scaling(self, params: dict[str, str]) -> Response:
        group = clean_relpath(params.get("group") or "")
        _, groups = self.index.scan()
        if group and group not in groups:
            raise PathNotFound(f"{group} is not a group of runs")
        rows, _ = self.index.scan()
        bins = _int_param(params, "bins", DEFAULT_BINS_PER_DECADE, 1, 20)
        target = _float_param(params, "target")
        if target is not None and not 0 < target < 1:
            raise BadRequest(f"parameter 'target' (an error) must be between 0 and 1, got {target}")
        payload = scaling_payload(rows, group, params.get("metric") or None, bins, target)
        payload["groups"] = group_list(groups)
        return 200, payload

    def checkpoints(self, params: dict[str, str]) -> Response:
        rows, _ = self.index.scan()
        out = []
        for r in rows:
            if r["kind"] == "train":
                out += list_checkpoints(self.tree, run_dir(self.tree, r["id"]))
        return 200, {"checkpoints": out, "enabled": self.spec.enable_try}

    def try_it(self, body: dict) -> Response:
        from clipforge.dashboard.tryit import Predictor, TryError, clean_captions, decode_image

        if not self.spec.enable_try:
            return error(404, "the 'try it' page is disabled")
        raw = body.get("checkpoint")
        if not isinstance(raw, str):
            raise BadRequest("'checkpoint' is required")
        rel = clean_relpath(raw)
        parts = rel.split("/")
        if len(parts) < 2 or parts[-2] != CHECKPOINTS_DIR:
            raise PathNotFound(f"{rel} is not a checkpoint of a run (RUN/{CHECKPOINTS_DIR}/NAME)")
        run_id = "/".join(parts[:-2])
        self._known_run(run_id)
        self.tree.check_inside(rel)
        found = {c["id"]: c for c in list_checkpoints(self.tree, run_dir(self.tree, run_id))}
        if rel not in found:
            raise PathNotFound(f"{rel} is not a complete checkpoint")
        model_name = found[rel]["model"]
        if not model_name:
            raise PathNotFound(f"{rel}/meta.json does not name its model")
        try:
            image = decode_image(body.get("image"), int(self.spec.max_upload_mb * 2**20))
            captions = clean_captions(body.get("captions"))
        except TryError as e:
            return error(400, str(e))
        if self._predictor is None:
            self._predictor = Predictor()
        t0 = time.perf_counter()
        try:
            result = self._predictor.predict(model_name, self.tree.location(rel), image, captions)
        except Exception as e:  # a checkpoint that does not load is the user's to know about
            log.exception("try it: %s", rel)
            return error(500, f"cannot run checkpoint {rel}: {type(e).__name__}: {e}")
        result["checkpoint"] = rel
        result["seconds"] = round(time.perf_counter() - t0, 3)
        return 200, result
