"""`clipforge dashboard --runs PATH`: the monitoring web UI over a folder of runs."""
from __future__ import annotations

import typer


def register(app: typer.Typer) -> None:
    """Add the `dashboard` command to the clipforge CLI."""

    @app.command()
    def dashboard(
        runs: str = typer.Option(..., "--runs", help="Folder of run directories: a local path or an fsspec URL "
                                 "(s3://bucket/runs)."),
        host: str = typer.Option("127.0.0.1", help="Address to bind; the default serves this machine only. Any "
                                 "other (0.0.0.0) serves everyone who can reach it: see the warning it prints."),
        port: int = typer.Option(8050, help="TCP port (0 picks a free one)."),
        max_depth: int = typer.Option(4, help="Folder levels below --runs searched for runs."),
        no_compute_estimates: bool = typer.Option(False, "--no-compute-estimates",
                                                  help="Do not build models to estimate params and GMACs."),
        no_try: bool = typer.Option(False, "--no-try", help="Disable the 'try it' page (no model loading)."),
    ) -> None:
        """Serve the runs table, run pages, comparisons, scaling fits and a 'try it' page (read-only)."""
        from pydantic import ValidationError

        from clipforge.cli.errors import fail
        from clipforge.dashboard.server import DashboardServer, exposure_warning
        from clipforge.dashboard.spec import DashboardSpec
        from clipforge.dashboard.tree import PathNotFound

        try:
            spec = DashboardSpec(runs=runs, host=host, port=port, max_depth=max_depth,
                                 estimate_compute=not no_compute_estimates, enable_try=not no_try)
        except ValidationError as e:
            fail(f"--{str(e.errors()[0]['loc'][0]).replace('_', '-')}: {e.errors()[0]['msg']}", code=2)
        try:
            server = DashboardServer(spec)
        except PathNotFound as e:
            fail(str(e), code=2)
        except OSError as e:
            fail(f"cannot listen on {host}:{port}: {e.strerror or e}")
        warning = exposure_warning(host, server.server_address[1], try_page=spec.enable_try)
        if warning:
            typer.echo(warning, err=True)
        typer.echo(f"clipforge dashboard for {server.dashboard.tree.url}: {server.url}/  (Ctrl-C stops)")
        try:
            server.serve_forever()
        except KeyboardInterrupt:
            pass
        finally:
            server.server_close()
