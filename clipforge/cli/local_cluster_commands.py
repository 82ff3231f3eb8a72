"""`clipforge cluster up|status|down`: a Ray cluster of several nodes on this machine, for trying the cluster path
(`clipforge submit`, s3:// paths, jobs spread over nodes) without a real cluster.

  clipforge cluster up [--nodes N] [--cpus-per-node C] [--head-cpus H] [--s3] [--dir DIR]
  clipforge cluster status [--dir DIR]
  clipforge cluster down [--dir DIR]

`up` starts the nodes in the background, prints the `export` lines a shell needs to use them (so
`eval "$(clipforge cluster up)"` works) and returns; `down` stops exactly what `up` started. See
`clipforge.runtime.local_cluster` for how.
"""
from __future__ import annotations

import os
import shlex
from pathlib import Path
from typing import Optional

import typer

from clipforge.cli.errors import CommandGroup, fail

DIR_VARIABLE = "CLIPFORGE_CLUSTER_DIR"
DIR_HELP = (f"Folder of the cluster's state and logs (default: ${DIR_VARIABLE}, else "
            "$XDG_STATE_HOME/clipforge/local-cluster, i.e. ~/.local/state/clipforge/local-cluster).")


def default_dir() -> Path:
    """$CLIPFORGE_CLUSTER_DIR, else the user's state folder (XDG): one local cluster per user by default."""
    if os.environ.get(DIR_VARIABLE):
        return Path(os.environ[DIR_VARIABLE])
    state_home = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(state_home) / "clipforge" / "local-cluster"


def _note(message: str) -> None:
    typer.echo(message, err=True)


def up(
    nodes: int = typer.Option(2, "--nodes", min=0, max=64, help="Worker nodes (besides the head)."),
    cpus_per_node: int = typer.Option(1, "--cpus-per-node", min=0, help="CPUs each worker node offers to Ray."),
    head_cpus: int = typer.Option(0, "--head-cpus", min=0,
                                  help="CPUs the head offers (0: it only schedules and runs job drivers)."),
    s3: bool = typer.Option(False, "--s3", help="Also start moto_server as the cluster's S3 store, with bucket "
                                                "`clipforge` (needs `pip install 'moto\\[server]'`)."),
    object_store_mb: int = typer.Option(512, "--object-store-mb", min=80, help="Ray object store size per node, MiB."),
    cluster_dir: Optional[Path] = typer.Option(None, "--dir", help=DIR_HELP),
) -> None:
    """Start a head and --nodes worker nodes on 127.0.0.1, each its own raylet, and leave them running.

    Prints the `export` lines a shell needs to use the cluster: `eval "$(clipforge cluster up)"`."""
    from clipforge.runtime.local_cluster import LocalCluster

    root = cluster_dir or default_dir()
    _note(f"starting a local Ray cluster in {root}: head + {nodes} worker node(s) of {cpus_per_node} CPU(s)"
          + (" + moto_server (S3)" if s3 else "") + " ...")
    cluster = LocalCluster.start(root, workers=nodes, cpus_per_worker=cpus_per_node, head_cpus=head_cpus, s3=s3,
                                 object_store_mb=object_store_mb)
    for name, value in cluster.client_env().items():
        typer.echo(f"export {name}={shlex.quote(value)}")
    _note(f"up: head {cluster.address}, dashboard and job server {cluster.dashboard_url}")
    if cluster.s3_endpoint:
        _note(f"S3 store: {cluster.s3_endpoint}, bucket s3://{cluster.s3_bucket}/ (credentials in the exports)")
    _note(f"submit jobs: clipforge submit SPEC.yaml --address {cluster.dashboard_url}")
    _note(f"stop it:     clipforge cluster down --dir {shlex.quote(str(root))}")


def status(cluster_dir: Optional[Path] = typer.Option(None, "--dir", help=DIR_HELP)) -> None:
    """List the local cluster's nodes (alive, CPUs, processes) and its S3 store."""
    from clipforge.runtime.local_cluster import LocalCluster, LocalClusterError

    cluster = LocalCluster.load(cluster_dir or default_dir())
    typer.echo(f"local Ray cluster in {cluster.root}")
    typer.echo(f"  address    {cluster.address}   (RAY_ADDRESS)")
    typer.echo(f"  dashboard  {cluster.dashboard_url}   (clipforge submit --address)")
    store = f"{cluster.s3_endpoint}, bucket s3://{cluster.s3_bucket}/" if cluster.s3_endpoint else "none"
    typer.echo(f"  S3 store   {store}")
    try:
        infos = cluster.nodes()
    except LocalClusterError as e:
        for name in cluster.names():
            typer.echo(f"  {name}: {len(cluster.pids(name))} process(es) running")
        fail(str(e))
    rows = [("NODE", "ALIVE", "CPUS", "RESOURCE", "PROCESSES", "NODE ID")]
    for info in infos:
        resource = next((r for r in info.resources if r.startswith("clipforge_")), "-")
        rows.append((info.name, "yes" if info.alive else "no", f"{info.cpus:g}", resource, str(len(info.pids)),
                     info.node_id or "-"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        typer.echo("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip())


def down(cluster_dir: Optional[Path] = typer.Option(None, "--dir", help=DIR_HELP)) -> None:
    """Stop every process the local cluster started (moto_server's too); its logs stay in DIR/logs."""
    from clipforge.runtime.local_cluster import LOGS_DIR, LocalCluster

    cluster = LocalCluster.load(cluster_dir or default_dir())
    stopped = cluster.stop()
    typer.echo(f"stopped the local cluster in {cluster.root} ({len(stopped)} processes); logs kept in "
               f"{cluster.root / LOGS_DIR}")


def register(app: typer.Typer) -> None:
    """Add `cluster up|status|down` to the main `clipforge` app."""
    group = typer.Typer(cls=CommandGroup, no_args_is_help=True,
                        help="A Ray cluster of several nodes on this machine, for trying the cluster path.")
    group.command("up")(up)
    group.command("status")(status)
    group.command("down")(down)
    app.add_typer(group, name="cluster")
