"""Cluster commands of the `clipforge` command line: submit specs to a Ray cluster, watch and stop its jobs,
and render specs as KubeRay RayJob manifests.

  clipforge submit SPEC.yaml [field=value ...] --address http://HEAD:8265 [--working-dir DIR] [--no-wait|--follow]
                 [--no-forward-credentials]     (a sweep: each child its own job, followed until all have ended)
  clipforge jobs list|status|logs|stop ... --address http://HEAD:8265
  clipforge render kuberay SPEC.yaml [field=value ...] [--image IMAGE]

`--address` defaults to RAY_API_SERVER_ADDRESS, then RAY_ADDRESS. `submit` hands the job this shell's
object-store settings (AWS_* variables, or its AWS profile resolved here) in a file of the job's working dir,
out of every job listing; `--no-forward-credentials` hands none (the cluster has credentials of its own).
"""
from __future__ import annotations

import datetime as dt
import json
import logging
import sys
from pathlib import Path
from typing import Any, List, Optional

import typer

from clipforge.cli.errors import CommandGroup, fail
from clipforge.errors import EXIT_INVALID, SpecError, UserError

ADDRESS_HELP = "Ray dashboard URL, e.g. http://HEAD:8265 (default: $RAY_API_SERVER_ADDRESS, then $RAY_ADDRESS)."
LOG_TAIL_LINES = 30


def _note(message: str) -> None:
    typer.echo(message, err=True)


def _load(spec_path: Path, overrides: list[str]):
    from clipforge.cluster.specs import load_spec

    return load_spec(spec_path, overrides)


def _connect(address: str | None, timeout_s: float):
    from clipforge.cluster.submit import connect

    return connect(address, timeout_s)


def _quiet_ray_client() -> None:
    # The job client logs its HTTP chatter at INFO (and sets that level when imported, hence the import
    # first); the commands print what matters themselves.
    import ray.job_submission  # noqa: F401 - imported for its side effect on the log levels, undone below

    for name in ("ray", "ray.dashboard", "ray.dashboard.modules.job.sdk", "ray.dashboard.modules.dashboard_sdk"):
        logging.getLogger(name).setLevel(logging.WARNING)


def _object_store_settings(s, forward: bool) -> dict[str, str]:
    """The object-store settings to hand the job(s), after one note naming them (names only, never values)."""
    from clipforge.cluster.submit import forwarded_settings
    from clipforge.runtime.job_credentials import SECRET_VARIABLES, client_settings

    in_spec = sorted(set(SECRET_VARIABLES) & set(s.ray.runtime_env.get("env_vars") or {}))
    if in_spec:
        _note(f"warning: field `ray.runtime_env.env_vars` sets {', '.join(in_spec)}: the cluster's job, task and "
              "actor listings show the values; leave them out, and submit forwards this shell's settings unlisted")
    if not forward:
        _note("not forwarding object-store settings (--no-forward-credentials): the job uses the cluster's own")
        return {}
    settings = client_settings()
    # A sweep's children are handed the settings their own specs do not set; the base spec's names are shown.
    values = forwarded_settings(s, settings.values)
    if values:
        source = f" (credentials of {settings.resolved_from}, resolved here)" if settings.resolved_from else ""
        _note(f"forwarding {', '.join(values)} to the job, out of its listings{source}")
    return settings.values


def _exit_for(status: str) -> None:
    if status != "SUCCEEDED":
        raise typer.Exit(1)


def _show_failure(client, job_id: str) -> None:
    from clipforge.cluster.submit import job_info, job_logs

    info = job_info(client, job_id)
    if info.message and info.message.strip():
        # Ray appends the log tail to the message; that tail is printed below, once.
        _note(f"message: {info.message.strip().splitlines()[0]}")
    tail = job_logs(client, job_id).rstrip().splitlines()[-LOG_TAIL_LINES:]
    if tail:
        _note(f"last {len(tail)} log lines:")
        for line in tail:
            _note(f"  {line}")


def submit(
    spec: Path = typer.Argument(..., help="Spec YAML file."),
    overrides: Optional[List[str]] = typer.Argument(None, help="field=value overrides, e.g. optim.lr=1e-4."),
    address: Optional[str] = typer.Option(None, "--address", help=ADDRESS_HELP),
    working_dir: Optional[Path] = typer.Option(
        None, "--working-dir", help="Folder shipped as the job's working dir (your code/data); the spec is added."),
    no_wait: bool = typer.Option(False, "--no-wait", help="Print the submission id and return at once."),
    follow: bool = typer.Option(False, "--follow", help="Stream the job's logs until it ends."),
    submission_id: Optional[str] = typer.Option(None, "--submission-id", help="Job id (default: generated)."),
    entrypoint_num_cpus: float = typer.Option(0.0, min=0, help="CPUs reserved for the job's driver process."),
    entrypoint_num_gpus: float = typer.Option(0.0, min=0, help="GPUs reserved for the job's driver process."),
    timeout_s: float = typer.Option(10.0, "--connect-timeout", min=0.1, help="Seconds to wait for the cluster."),
    forward_credentials: bool = typer.Option(
        True, "--forward-credentials/--no-forward-credentials",
        help="Hand the job this shell's object-store settings (AWS_* variables, or the AWS profile resolved here) "
             "in a file only the job reads; off for clusters with credentials of their own (instance roles, IRSA)."),
) -> None:
    """Validate a spec and run it as a job on a Ray cluster (`clipforge run` on the cluster)."""
    from clipforge.cluster.submit import check_runtime_env, follow_logs, submit_spec, wait_for_job

    if no_wait and follow:
        fail("--no-wait and --follow exclude each other", code=EXIT_INVALID)
    s = _load(spec, overrides or [])
    try:
        check_runtime_env(s)
    except UserError as e:
        raise SpecError(f"{spec}: {e}") from None
    if s.kind == "sweep":
        given = [flag for flag, on in (("--no-wait", no_wait), ("--follow", follow),
                                       ("--submission-id", submission_id)) if on]
        if given:
            fail(f"{given[0]} does not apply to a sweep: this command submits its children as they fit "
                 "max_concurrent and follows them (read a child's logs with `clipforge jobs logs ID`)",
                 code=EXIT_INVALID)
    credentials = _object_store_settings(s, forward_credentials)
    _quiet_ray_client()
    client = _connect(address, timeout_s)
    url = client.get_address()
    if s.kind == "sweep":
        _submit_sweep(client, s, working_dir, entrypoint_num_cpus, entrypoint_num_gpus, credentials)
        return
    job_id = submit_spec(client, s, working_dir=working_dir, submission_id=submission_id,
                         entrypoint_num_cpus=entrypoint_num_cpus, entrypoint_num_gpus=entrypoint_num_gpus,
                         credentials=credentials)
    typer.echo(job_id)
    _note(f"submitted `{s.kind}` job {job_id} to {url}")
    if no_wait:
        _note(f"follow it with: clipforge jobs logs {job_id} --address {url} --follow")
        return
    try:
        if follow:
            status = follow_logs(client, job_id, lambda chunk: (sys.stdout.write(chunk), sys.stdout.flush()))
        else:
            status = wait_for_job(client, job_id, on_status=lambda st: _note(f"{job_id}: {st}"))
    except KeyboardInterrupt:
        _note(f"\nstopped watching; job {job_id} keeps running (stop it: clipforge jobs stop {job_id} "
              f"--address {url})")
        raise typer.Exit(130) from None
    _note(f"job {job_id} {status}")
    if status == "FAILED" and not follow:
        _show_failure(client, job_id)
    _exit_for(status)


def _submit_sweep(client, s, working_dir: Optional[Path], entrypoint_num_cpus: float,
                  entrypoint_num_gpus: float, credentials: dict[str, str]) -> None:
    """Each child of the sweep as its own job, at most `max_concurrent` at once, followed to the end."""
    from clipforge.cluster.sweep_submit import submit_sweep

    _note(f"sweep `{s.name}`: submitting its children to {client.get_address()}, at most {s.max_concurrent} at once")
    try:
        summary = submit_sweep(client, s, working_dir=working_dir, entrypoint_num_cpus=entrypoint_num_cpus,
                               entrypoint_num_gpus=entrypoint_num_gpus, on_status=_note, credentials=credentials)
    except KeyboardInterrupt:
        _note("\nstopped watching; submitted children keep running. Submit the same sweep again to follow them "
              "(finished children are skipped)")
        raise typer.Exit(130) from None
    typer.echo(json.dumps(summary, indent=2))


def _when(ms: int | None) -> str:
    if not ms:
        return "-"
    return dt.datetime.fromtimestamp(ms / 1000, tz=dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S")


def _duration(start_ms: int | None, end_ms: int | None) -> str:
    if not start_ms:
        return "-"
    end = end_ms or dt.datetime.now(tz=dt.timezone.utc).timestamp() * 1000
    secs = int(max(0, end - start_ms) / 1000)
    return f"{secs // 3600}:{secs // 60 % 60:02d}:{secs % 60:02d}"


def jobs_list(address: Optional[str] = typer.Option(None, "--address", help=ADDRESS_HELP),
              timeout_s: float = typer.Option(10.0, "--connect-timeout", min=0.1)) -> None:
    """List the cluster's jobs, oldest first."""
    from clipforge.cluster.submit import list_jobs

    _quiet_ray_client()
    client = _connect(address, timeout_s)
    jobs = list_jobs(client)
    rows = [("SUBMISSION ID", "STATUS", "KIND", "NAME", "STARTED (UTC)", "DURATION")]
    for j in jobs:
        meta = j.metadata or {}
        rows.append((j.submission_id or j.job_id or "-", j.status.value, meta.get("clipforge.kind", "-"),
                     meta.get("clipforge.name", "-"), _when(j.start_time), _duration(j.start_time, j.end_time)))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        typer.echo("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())


def jobs_status(job_id: str = typer.Argument(..., help="Submission id."),
                address: Optional[str] = typer.Option(None, "--address", help=ADDRESS_HELP),
                timeout_s: float = typer.Option(10.0, "--connect-timeout", min=0.1)) -> None:
    """Print a job's status (PENDING, RUNNING, SUCCEEDED, FAILED, STOPPED) and its message."""
    from clipforge.cluster.submit import job_info

    _quiet_ray_client()
    client = _connect(address, timeout_s)
    info = job_info(client, job_id)
    typer.echo(f"{job_id}: {info.status.value}")
    if info.message and info.message.strip():
        # The first line says what happened; Ray appends the log tail, which `jobs logs` shows in full.
        typer.echo(f"message: {info.message.strip().splitlines()[0]}")


def jobs_logs(job_id: str = typer.Argument(..., help="Submission id."),
              address: Optional[str] = typer.Option(None, "--address", help=ADDRESS_HELP),
              follow: bool = typer.Option(False, "--follow", "-f", help="Stream new lines until the job ends."),
              timeout_s: float = typer.Option(10.0, "--connect-timeout", min=0.1)) -> None:
    """Print a job's logs (driver stdout/stderr)."""
    from clipforge.cluster.submit import follow_logs, job_logs

    _quiet_ray_client()
    client = _connect(address, timeout_s)
    if follow:
        status = follow_logs(client, job_id, lambda chunk: (sys.stdout.write(chunk), sys.stdout.flush()))
        _note(f"job {job_id} {status}")
    else:
        typer.echo(job_logs(client, job_id), nl=False)


def jobs_stop(job_id: str = typer.Argument(..., help="Submission id."),
              address: Optional[str] = typer.Option(None, "--address", help=ADDRESS_HELP),
              wait_s: float = typer.Option(30.0, "--wait", min=0, help="Seconds to wait for the job to stop."),
              timeout_s: float = typer.Option(10.0, "--connect-timeout", min=0.1)) -> None:
    """Stop a running job and wait until it has stopped."""
    from clipforge.cluster.submit import TERMINAL, stop_job

    _quiet_ray_client()
    client = _connect(address, timeout_s)
    status = stop_job(client, job_id, wait_s=wait_s)
    typer.echo(f"{job_id}: {status}")
    if status not in TERMINAL:
        fail(f"job {job_id} is still {status} after {wait_s:g} s")


def render_kuberay(
    spec: Path = typer.Argument(..., help="Spec YAML file."),
    overrides: Optional[List[str]] = typer.Argument(None, help="field=value overrides."),
    image: Optional[str] = typer.Option(None, help="Container image with clipforge installed."),
    namespace: Optional[str] = typer.Option(None, help="Kubernetes namespace of the RayJob."),
    head_cpus: Optional[int] = typer.Option(None, min=0, help="CPUs of the head pod."),
    head_memory_gib: Optional[int] = typer.Option(None, min=1, help="Memory of the head pod, GiB."),
    memory_gib_per_cpu: Optional[float] = typer.Option(None, help="Worker pod memory per CPU, GiB."),
    ttl_seconds_after_finished: Optional[int] = typer.Option(None, "--ttl", min=0,
                                                            help="Seconds the finished cluster is kept."),
    backoff_limit: Optional[int] = typer.Option(None, min=0, help="Retries of a failed job."),
    submission_mode: Optional[str] = typer.Option(None, help="K8sJobMode or HTTPMode."),
) -> None:
    """Print the spec as a KubeRay RayJob manifest (pipe it to `kubectl apply -f -`); warns on stderr about each
    local path of the spec, which the cluster's pods cannot see."""
    from pydantic import ValidationError

    from clipforge.cluster.kuberay import KubeRayOptions, local_path_warnings, manifest_yaml, render_rayjob

    s = _load(spec, overrides or [])
    if s.kind == "sweep":
        raise SpecError(f"{spec}: a sweep is many jobs and has no single RayJob; run it with `clipforge submit` "
                        "against the cluster, or render its base spec")
    given: dict[str, Any] = {
        "image": image, "namespace": namespace, "head_cpus": head_cpus, "head_memory_gib": head_memory_gib,
        "memory_gib_per_cpu": memory_gib_per_cpu, "ttl_seconds_after_finished": ttl_seconds_after_finished,
        "backoff_limit": backoff_limit, "submission_mode": submission_mode}
    try:
        options = KubeRayOptions(**{k: v for k, v in given.items() if v is not None})
    except ValidationError as e:
        err = e.errors()[0]
        fail(f"--{str(err['loc'][0]).replace('_', '-')}: {err['msg']}", code=EXIT_INVALID)
    try:
        manifest = manifest_yaml(render_rayjob(s, options))
    except UserError as e:
        raise SpecError(f"{spec}: {e}") from None
    for warning in local_path_warnings(s):
        _note(warning)
    typer.echo(manifest, nl=False)


def register(app: typer.Typer) -> None:
    """Add `submit`, `jobs ...` and `render ...` to the main `clipforge` app."""
    app.command("submit")(submit)
    jobs = typer.Typer(cls=CommandGroup, no_args_is_help=True, help="Watch, read and stop jobs on a Ray cluster.")
    jobs.command("list")(jobs_list)
    jobs.command("status")(jobs_status)
    jobs.command("logs")(jobs_logs)
    jobs.command("stop")(jobs_stop)
    app.add_typer(jobs, name="jobs")
    render = typer.Typer(cls=CommandGroup, no_args_is_help=True, help="Render a spec as a manifest for another system.")
    render.command("kuberay")(render_kuberay)
    app.add_typer(render, name="render")
