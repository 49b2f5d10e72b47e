"""``latentbatch stack up|down|status``: the local Prefect + Dask stack."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from latentbatch.cli.common import (
    JsonOption,
    emit_json,
    make_console,
)
from latentbatch.engine import stack

stack_app = typer.Typer(help="A local Prefect + Dask stack on 127.0.0.1.", no_args_is_help=True)
StackHome = Annotated[Path, typer.Option(help="Folder of PIDs, logs and addresses.")]


@stack_app.command("up")
def stack_up(
    home: StackHome = stack.DEFAULT_HOME,
    project: Annotated[
        Path, typer.Option(help="Repository root (holds deploy/prefect.yaml).")
    ] = Path(),
    workers: Annotated[
        int | None,
        typer.Option(min=1, help="Dask worker processes \\[default: one per GPU, else 2]."),
    ] = None,
    port: Annotated[int, typer.Option(help="Preferred Prefect server port.")] = 4200,
) -> None:
    """Start a Prefect server, worker and deployments and a Dask cluster on 127.0.0.1."""
    info = stack.up(home, project, workers, port)
    console = make_console()
    console.print(f"Prefect UI      {info.ui_url}", highlight=False)
    console.print(f"Prefect API     {info.api_url}", highlight=False)
    console.print(f"Dask scheduler  {info.scheduler}", highlight=False)
    console.print(f"Dask dashboard  {info.dashboard}", highlight=False)
    console.print(f"PIDs and logs   {info.home}", highlight=False)
    console.print(f"use it:         set -a; . {info.home / 'stack.env'}; set +a", highlight=False)


@stack_app.command("down")
def stack_down(home: StackHome = stack.DEFAULT_HOME) -> None:
    """Stop exactly the processes that `stack up` started."""
    stopped = stack.down(home)
    make_console().print(
        f"stopped {', '.join(stopped) if stopped else 'nothing (no stack was running)'}"
    )


@stack_app.command("status")
def stack_status(
    home: StackHome = stack.DEFAULT_HOME,
    as_json: JsonOption = False,
) -> None:
    """Tell which stack processes run and whether the server answers."""
    report = stack.status(home)
    if as_json:
        emit_json(report)
        return
    console = make_console()
    for name, pid in report["processes"].items():
        console.print(
            f"{name:>16}  {'running, pid ' + str(pid) if pid else 'stopped'}", highlight=False
        )
    console.print(f"{'server':>16}  {'healthy' if report['server_healthy'] else 'not answering'}")
