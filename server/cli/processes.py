"""The long-running commands: the API (`serve`), the workers, the dashboard, and the whole
embedded stack (`up`). Every command that starts child processes supervises them with the one
`Supervisor` of server/stack.py: a signal reaches every child, and when one dies on its own the
others are stopped and the command says which.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated

import typer

from server.cli.app import app, engine, err, fail, guarded, run_stack, say
from server.settings import Settings, get_settings
from server.stack import Supervisor

# the dashboard's Streamlit script, in the source tree next to server/
DASHBOARD = Path(__file__).resolve().parents[2] / "dashboard" / "app.py"


@app.command()
@guarded
def serve(
    host: Annotated[str | None, typer.Option(help="Bind address (default ERPD_HOST).")] = None,
    port: Annotated[int | None, typer.Option(help="Port (default ERPD_PORT).")] = None,
    workers: Annotated[
        int | None, typer.Option(min=1, help="API processes (default ERPD_API_WORKERS).")
    ] = None,
) -> None:
    """Run the REST API (uvicorn). Binds 127.0.0.1 unless told otherwise."""
    import uvicorn

    settings = get_settings()
    engine().dispose()
    uvicorn.run(
        "server.main:create_app",
        factory=True,
        host=host or settings.host,
        port=port or settings.port,
        workers=workers or settings.api_workers,
        log_level="info",
    )


def _celery(name: str, queues: list[str], pool: str, concurrency: int, loglevel: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "celery",
        "-A",
        "worker.celery_app",
        "worker",
        "--pool",
        pool,
        "--concurrency",
        str(concurrency),
        "--queues",
        ",".join(queues),
        "--hostname",
        f"{name}@%h",
        "--loglevel",
        loglevel,
    ]


def _start_workers(
    sup: Supervisor,
    settings: Settings,
    slots: list[str | None],
    *,
    group: bool,
    housekeeping: bool,
    loglevel: str,
) -> None:
    """One solo-pool worker per slot (or one for all of them with `group`), and the
    housekeeping worker."""
    # a stage runs for hours: housekeeping messages must not wait behind one
    for owned in [slots] if group else [[slot] for slot in slots]:
        env = sup.env | {"ERPD_WORKER_GPUS": str(len(owned))}
        queues, name = [settings.queue], "erpd-cpu"
        if owned != [None]:
            env["CUDA_VISIBLE_DEVICES"] = ",".join(str(s) for s in owned)
            queues += [f"{settings.queue}.{s}" for s in owned]
            name = "erpd-gpu" + "-".join(str(s) for s in owned)
        sup.spawn(name, _celery(name, queues, "solo", 1, loglevel), env=env)
    if housekeeping:
        # webhook deliveries wait on remote hosts: a few threads, no GPU
        env = sup.env | {"CUDA_VISIBLE_DEVICES": ""}
        # named after the slots: `worker --gpus 0` and `--gpus 1` on one host stay distinct
        name = "erpd-housekeeping" + "".join(f"-gpu{slot}" for slot in slots if slot is not None)
        queue = [settings.housekeeping_queue]
        sup.spawn(name, _celery(name, queue, "threads", 4, loglevel), env=env)


@app.command()
@guarded
def worker(
    gpus: Annotated[
        str | None,
        typer.Option(help="GPU indices, e.g. 0,1: one solo-pool worker per GPU. None = CPU."),
    ] = None,
    group: Annotated[
        bool,
        typer.Option(
            help="One worker owns all the --gpus and runs each stage on runtime.gpus of them "
            "(torchrun, FSDP2): one worker per node."
        ),
    ] = False,
    housekeeping: Annotated[
        bool,
        typer.Option(help="Also start a worker for the cpu queue (webhook deliveries)."),
    ] = True,
    loglevel: Annotated[str, typer.Option(help="Celery log level.")] = "INFO",
) -> None:
    """Start the workers that run queued stages (one per GPU, or one on CPU) and a housekeeping
    worker, supervised: a signal reaches them all, and the command exits when they have."""
    settings = get_settings()
    engine().dispose()
    slots: list[str | None] = (
        [None] if gpus is None else [g.strip() for g in gpus.split(",") if g.strip()]
    )
    for slot in slots:
        if slot is not None and not slot.isdigit():
            fail(f"--gpus: {slot!r} is not a GPU index", 2)
    if group and gpus is None:
        fail("--group: name the GPUs the worker owns with --gpus", 2)
    # attached: the Celery processes share this command's process group, so stopping the group
    # stops them too; a warm shutdown may take as long as the stage it finishes
    sup = Supervisor(dict(os.environ), detached=False)
    _start_workers(sup, settings, slots, group=group, housekeeping=housekeeping, loglevel=loglevel)
    sup.handle_signals()
    died = sup.watch()
    if died is not None and not sup.signalled:  # one died on its own (e.g. killed for memory)
        code = sup.children[died].returncode
        sup.stop()
        fail(f"a Celery worker exited with code {code}; stopped the others")
    if any(sup.wait().values()):
        raise typer.Exit(1)


@app.command()
@guarded
def dashboard(
    host: Annotated[str, typer.Option(help="Bind address.")] = "127.0.0.1",
    port: Annotated[
        int, typer.Option(envvar="ERPD_DASHBOARD_PORT", help="Port.", min=1, max=65535)
    ] = 8501,
    api_url: Annotated[
        str | None, typer.Option(help="The API it reads (default ERPD_DASHBOARD_API_URL).")
    ] = None,
) -> None:
    """Run the Streamlit dashboard. It reads the REST API only; binds 127.0.0.1 by default.
    The API key comes from ERPD_DASHBOARD_API_KEY or the sidebar."""
    env = dict(os.environ)
    if api_url:
        env["ERPD_DASHBOARD_API_URL"] = api_url
    argv = [
        sys.executable,
        "-m",
        "streamlit",
        "run",
        str(DASHBOARD),
        "--server.address",
        host,
        "--server.port",
        str(port),
        "--server.headless",
        "true",
        "--browser.gatherUsageStats",
        "false",
        "--global.developmentMode",
        "false",
        "--client.toolbarMode",
        "viewer",
    ]
    sup = Supervisor(env, detached=False)  # stopping this stops streamlit
    sup.spawn("streamlit", argv)
    sup.handle_signals()
    sup.watch()
    raise typer.Exit(sup.wait()["streamlit"])


@app.command()
@guarded
def up(
    gpus: Annotated[
        str | None, typer.Option(help="GPU indices for the worker, e.g. 0,1. None = CPU.")
    ] = None,
    api_port: Annotated[int | None, typer.Option(help="API port (default ERPD_PORT).")] = None,
    dashboard_port: Annotated[
        int, typer.Option(envvar="ERPD_DASHBOARD_PORT", help="Dashboard port.")
    ] = 8501,
    dashboard_: Annotated[
        bool, typer.Option("--dashboard/--no-dashboard", help="Start the dashboard too.")
    ] = True,
    reap_every: Annotated[float, typer.Option(help="Seconds between reaper rounds.")] = 5.0,
) -> None:
    """The whole embedded stack, supervised: migrations, the API, a worker (CPU or each GPU),
    the reaper and the dashboard, under ERPD_HOME. Ctrl-C stops it all."""
    run_stack(
        lambda stack: say("\n".join([*stack.banner, "Ctrl-C stops everything."])),
        gpus=gpus,
        api_port=api_port,
        dashboard_port=dashboard_port if dashboard_ else None,
        reap_every=reap_every,
    )
    err.print("erpd-hub: stopped", highlight=False)
