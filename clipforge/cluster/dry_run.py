"""`clipforge run --dry-run SPEC`: everything a run would find out about its paths before it starts, without
starting Ray, loading torch or writing anything.

For a build, train or eval spec (and every child of a sweep): each input must exist (local files and
folders, or fsspec URLs read with this environment's credentials: s3:// through s3fs and the AWS_*
variables), a build's URL list must have its columns, shard lists must name *.tar shards; each output
folder is reported with what it holds. A train spec's plan (steps per epoch, total steps and samples) comes
from its shards' sample counts: a webdataset `sizes.json` beside the shards ({"shard.tar": samples}) where
there is one, else counting the shard's tar headers (`clipforge.train.shards.count_samples`, exactly what
training counts), up to MAX_COUNTED_SHARDS shards.

Each problem is one line naming the field and the path; all of them are reported together.
"""
from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import fsspec

from clipforge.cluster.spec_paths import SpecPath, resolved, spec_paths
from clipforge.cluster.train_plan import plan_train
from clipforge.errors import StorageError, UserError
from clipforge.pipeline.layout import SIZES_FILE
from clipforge.runtime.output_folder import folder_owner
from clipforge.runtime.storage_errors import storage_errors

# Shards without a sizes.json counted at most (counting reads every member header of a shard).
MAX_COUNTED_SHARDS = 256


class DryRunFailed(UserError):
    """Problems a dry run found in a spec's paths or data: one line each, naming the field and the path."""


@dataclass
class _Checks:
    """What a dry run found so far: report lines, problems, and what later checks reuse."""

    lines: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    checked: dict[tuple, list[str] | None] = field(default_factory=dict)  # (path, options) -> shard URLs
    counts: dict[str, int] = field(default_factory=dict)  # shard URL -> samples
    sized: set[str] = field(default_factory=set)  # shard URLs whose count came from a sizes.json

    def report(self, label: str, text: str) -> None:
        self.lines.append(f"{label:<6} {text}")

    def attempt(self, p: SpecPath, check: Callable[[], Any]) -> Any:
        """`check()`, or None after recording its problem; storage failures become a line naming `p`."""
        try:
            with storage_errors(p.field, p.path):
                return check()
        except UserError as e:
            self.problems.append(str(e))
            return None


def _n(count: int, noun: str) -> str:
    return f"{count} {noun}{'' if count == 1 else 's'}"


def _missing(p: SpecPath, problem: str) -> StorageError:
    return StorageError(f"field `{p.field}`: {p.path}: {problem}")


def _check_path(p: SpecPath) -> str:
    """What is at an input path that must be a file, a folder or either."""
    fs, path = fsspec.core.url_to_fs(p.path, **p.storage_options)
    if not fs.exists(path):
        raise _missing(p, "does not exist")
    is_dir = fs.isdir(path)
    if p.shape == "folder" and not is_dir:
        raise _missing(p, "is a file; a folder is expected here")
    if p.shape == "file" and is_dir:
        raise _missing(p, "is a folder; a file is expected here")
    return "folder" if is_dir else "file"


def _check_shards(p: SpecPath) -> list[str]:
    from clipforge.train.shards import expand_shards

    return expand_shards([p.path], f"field `{p.field}`")


def _check_url_list(spec) -> str:
    from clipforge.pipeline.inputs import UrlList

    files = UrlList(spec.input).files
    return f"{_n(len(files), 'URL list file')}, columns checked"


def _key(path: str, storage_options: dict) -> tuple[str, str]:
    return path, json.dumps(storage_options, sort_keys=True, default=str)


def check_input(checks: _Checks, spec, p: SpecPath) -> None:
    """Check one input path once (children of a sweep share most of theirs) and report what is there."""
    key = _key(p.path, p.storage_options)
    if key in checks.checked:
        return
    if p.shape == "shards":
        urls = checks.attempt(p, lambda: _check_shards(p))
        checks.checked[key] = urls
        if urls is not None:
            checks.report("input", f"{p.field}: {resolved(p.path)}: {_n(len(urls), 'shard')}")
        return
    checks.checked[key] = None
    found = checks.attempt(p, (lambda: _check_url_list(spec)) if p.shape == "url_list" else (lambda: _check_path(p)))
    if found is not None:
        checks.report("input", f"{p.field}: {resolved(p.path)}: {found}")


def _folder_state(p: SpecPath, spec) -> str:
    fs, path = fsspec.core.url_to_fs(p.path, **p.storage_options)
    root = path.rstrip("/") or path
    if not fs.exists(root):
        return "does not exist yet (the job creates it)"
    if not fs.isdir(root):
        raise _missing(p, "is a file; the job needs a folder here")
    entries = fs.ls(root, detail=False)
    if not entries:
        return "exists, empty"
    owner = folder_owner(p.path, p.storage_options)
    if owner is None:
        held = "1 file or folder" if len(entries) == 1 else f"{len(entries)} files or folders"
        return f"exists, holds {held}: the job writes there only if they are its own earlier output, or with " \
               "overwrite: true"
    if owner == (spec.kind, spec.name):
        return f"holds this {spec.kind} job's earlier output: the job continues there"
    return f"holds the output of `{owner[0]}` job `{owner[1]}`: the job writes there only with overwrite: true"


def check_output(checks: _Checks, spec, p: SpecPath) -> None:
    state = checks.attempt(p, lambda: _folder_state(p, spec))
    if state is not None:
        checks.report("output", f"{p.field}: {resolved(p.path)}: {state}")


def _sizes_files(urls: list[str]) -> dict[str, int]:
    """Sample counts that `sizes.json` files beside the shards give (shard URL -> samples)."""
    found: dict[str, int] = {}
    for folder in dict.fromkeys(url.rsplit("/", 1)[0] for url in urls if "/" in url):
        fs, path = fsspec.core.url_to_fs(f"{folder}/{SIZES_FILE}")
        if not fs.isfile(path):
            continue
        try:
            with fs.open(path, "r", encoding="utf-8") as f:
                sizes = json.load(f)
        except ValueError:  # not JSON, or not UTF-8
            sizes = None
        if not isinstance(sizes, dict):
            raise DryRunFailed(f"{folder}/{SIZES_FILE}: expected a JSON mapping of shard file names to sample counts "
                               "({\"00000.tar\": 1000, ...}); fix or delete it")
        for url in urls:
            name = url.rsplit("/", 1)[-1]
            if url.startswith(folder + "/") and isinstance(sizes.get(name), int):
                found[url] = sizes[name]
    return found


def _count(checks: _Checks, spec, urls: list[str], where: str) -> bool:
    """Fill in `checks.counts` for `urls`; False when too many shards would have to be read to count them."""
    from clipforge.train.shards import SampleKeys, count_samples

    todo = [u for u in dict.fromkeys(urls) if u not in checks.counts]
    with storage_errors(where, todo[0] if todo else where):
        from_sizes = _sizes_files(todo)
    checks.counts.update(from_sizes)
    checks.sized.update(from_sizes)
    unknown = [u for u in todo if u not in from_sizes]
    if len(unknown) > MAX_COUNTED_SHARDS:
        return False
    keys = SampleKeys.parse(spec.data.image_key, spec.data.text_key)
    for url in unknown:
        with storage_errors(where, url):
            checks.counts[url] = count_samples(url, keys)
    return True


def _source_urls(checks: _Checks, spec) -> list[list[str]] | None:
    """Each source's shard URLs as training lists them (None when a shard list had a problem)."""
    lists = []
    for source in spec.data.source_list():
        urls: list[str] = []
        for pattern in source.shards:
            found = checks.checked.get(_key(pattern, {}))
            if found is None:
                return None
            urls += found
        lists.append(list(dict.fromkeys(urls)))  # as expand_shards: duplicates dropped, first one kept
    return lists


def check_train_plan(checks: _Checks, spec, label: str = "plan") -> None:
    """Report a train spec's steps and samples from its shards' sample counts (a problem when no step fits)."""
    lists = _source_urls(checks, spec)
    if lists is None:
        return  # the shard lists' own problems are reported already
    all_urls = [u for urls in lists for u in urls]
    field_name = "data.shards" if spec.data.sources is None else "data.sources"
    try:
        counted = _count(checks, spec, all_urls, field_name)
    except UserError as e:
        checks.problems.append(str(e))
        return
    if not counted:
        checks.report(label, f"{len(all_urls)} shards, not counted: without a {SIZES_FILE} beside them counting "
                             f"reads every shard (more than {MAX_COUNTED_SHARDS}); add one to see the plan")
        return
    plan = plan_train(spec, [[checks.counts[u] for u in urls] for urls in lists])
    sized = sum(1 for u in all_urls if u in checks.sized)
    origin = f"{sized} from {SIZES_FILE}, {len(all_urls) - sized} counted" if sized else "counted"
    workers = spec.scaling.workers
    epoch = "nominal epoch (resampled)" if spec.data.resampled else "epoch"
    if plan.steps_per_epoch < 1:
        checks.problems.append(
            f"field `{field_name}`: {plan.samples_per_epoch} samples in {_n(len(all_urls), 'shard')} fill no step: one "
            f"step needs a local batch of {spec.data.batch_size // workers} on each of {workers} workers "
            f"(data.batch_size {spec.data.batch_size}); lower data.batch_size or add data")
        return
    checks.report(label, f"{_n(len(all_urls), 'shard')}, {plan.samples_per_epoch} samples ({origin}); global "
                         f"batch {plan.global_batch} ({workers} workers x {plan.global_batch // workers}): "
                         f"{_n(plan.steps_per_epoch, 'step')} per {epoch}; {_budget(spec)}: "
                         f"{_n(plan.total_steps, 'step')}, {plan.total_samples} samples")


def _budget(spec) -> str:
    optim = spec.optim
    if optim.steps is not None:
        return f"optim.steps {optim.steps}"
    if optim.samples is not None:
        return f"optim.samples {optim.samples}"
    return f"optim.epochs {optim.epochs}"


def check_job(checks: _Checks, spec) -> None:
    """All checks of one build, train or eval spec: inputs, outputs, and a train spec's plan."""
    paths = spec_paths(spec)
    for p in paths:
        if p.role == "input":
            check_input(checks, spec, p)
    for p in paths:
        if p.role == "output":
            check_output(checks, spec, p)
    if spec.kind == "train":
        check_train_plan(checks, spec)


def _values_text(values: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in values.items()) or "the base spec as it is"


def check_sweep(checks: _Checks, spec) -> None:
    """A sweep's children (name, swept values, run folder), then every child's checks."""
    from clipforge.cluster.sweep_children import expand_children, storage_root

    children = expand_children(spec)
    checks.report("sweep", f"{len(children)} children, at most {spec.max_concurrent} at once; sweep folder "
                           f"{storage_root(spec.storage)}")
    for child in children:
        checks.report("child", f"{child.dir} ({_values_text(child.values)}) -> {resolved(child.run_dir)}")
    check_output(checks, spec, SpecPath("storage", spec.storage, "output", "folder"))
    for child in children:
        paths = spec_paths(child.spec)
        for p in paths:
            if p.role == "input":
                check_input(checks, child.spec, p)
        if child.spec.kind == "train":
            check_train_plan(checks, child.spec, label=f"plan {child.dir}:")


def dry_run(spec, source: str, echo: Callable[[str], None]) -> None:
    """Check a validated spec's paths and plan, `echo`ing the report; DryRunFailed lists every problem."""
    echo(f"dry run of {source}: a valid `{spec.kind}` spec; checking its paths (nothing is started or written)")
    checks = _Checks()
    if spec.kind == "sweep":
        check_sweep(checks, spec)
    else:
        check_job(checks, spec)
    for line in checks.lines:
        echo(line)
    if checks.problems:
        raise DryRunFailed("\n".join(dict.fromkeys(checks.problems)))
    echo("ok: no problems found")
