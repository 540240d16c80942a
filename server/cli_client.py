"""`erpd-hub submit | runs | logs | download`: the CLI verbs over the REST API (erpd_hub/client.py).

They reach the API at `--api-url` (ERPD_API_URL, default this machine's ERPD_PORT) with `--key`
(ERPD_API_KEY, else the key `erpd-hub up` keeps in $ERPD_HOME/api-key).
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Iterable
from pathlib import Path
from typing import Annotated, Any

import typer

from erpd_hub.client import ApiClient, ApiError
from server.settings import get_settings

ApiUrl = Annotated[
    str | None, typer.Option("--api-url", envvar="ERPD_API_URL", help="The API, e.g. .../api/v1.")
]
Key = Annotated[
    str | None,
    typer.Option("--key", envvar="ERPD_API_KEY", help="API key (default: $ERPD_HOME/api-key)."),
]
# the metrics `logs` prints per step, when a run has them
SHOWN = ["loss", "kl/exact", "kl/k3", "entropy/token", "acc/train_batch", "acc/eval"]


def _connect(api_url: str | None, key: str | None) -> ApiClient:
    from server.cli import _fail

    settings = get_settings()
    url = api_url or f"http://127.0.0.1:{settings.port}/api/v1"
    if not key:
        saved = settings.home / "api-key"
        key = saved.read_text().strip() if saved.is_file() else None
    if not key:
        _fail("no API key: pass --key, set ERPD_API_KEY, or run `erpd-hub up` once", 2)
    return ApiClient(url, key)


def load_spec(path: Path) -> dict[str, Any]:
    """A pipeline (or run) description from a YAML or JSON file; a bad one is one line, exit 2."""
    import yaml

    from server.cli import _fail

    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        _fail(f"{path}: {exc}", 2)
    if not isinstance(data, dict):
        _fail(f"{path}: expected a mapping of pipeline (or run) fields", 2)
    return data


def _calling(fn: Any) -> Any:
    """Run a verb; an API error is one line (exit 2 for the caller's mistake, 1 otherwise)."""
    from server.cli import _fail, _guard

    def body() -> None:
        try:
            fn()
        except ApiError as exc:
            where = f" (field {exc.field})" if exc.field else ""
            _fail(f"{exc.message}{where}", 2 if 400 <= exc.status < 500 else 1)

    _guard(body)


def _line(step: int, values: dict[str, float | None]) -> str:
    shown = [f"{name}={values[name]:.4g}" for name in SHOWN if values.get(name) is not None]
    return f"step {step:>6}  " + "  ".join(shown)


def _print_steps(points: Iterable[tuple[int, str, float | None]]) -> None:
    """One line per step that has any of the SHOWN metrics, in step order."""
    from server.cli import say

    by_step: dict[int, dict[str, float | None]] = defaultdict(dict)
    for step, name, value in points:
        by_step[step][name] = value
    for step in sorted(by_step):
        if any(name in by_step[step] for name in SHOWN):
            say(_line(step, by_step[step]))


def register(app: typer.Typer) -> None:
    from server.cli import _fail, say

    @app.command()
    def submit(
        spec: Annotated[Path, typer.Argument(help="A pipeline (or one run, with `kind`): YAML.")],
        api_url: ApiUrl = None,
        key: Key = None,
        idempotency_key: Annotated[
            str | None, typer.Option(help="Submitting again with it creates nothing new.")
        ] = None,
        quiet: Annotated[
            bool, typer.Option("--quiet", "-q", help="Only the run ids, one per line.")
        ] = False,
    ) -> None:
        """Submit a pipeline (or a single run) described in a YAML or JSON file."""

        def body() -> None:
            data = load_spec(spec)
            api = _connect(api_url, key)
            if "kind" in data:
                run = api.submit_run(data, idempotency_key=idempotency_key)
                if quiet:
                    say(run["id"])
                    return
                say(f"run {run['id']}  {run['name']}  {run['status']}")
                return
            made = api.submit_pipeline(data, idempotency_key=idempotency_key)
            if quiet:  # round by round: the sample run, the teachers, the student
                say("\n".join(made["runs"]))
                return
            say(f"pipeline {made['id']}  {made['name']}")
            for run_id in made["runs"]:
                run = api.run(run_id)
                say(f"  run {run_id}  {run['name']}  {run['status']}")

        _calling(body)

    @app.command()
    def runs(
        status: Annotated[list[str] | None, typer.Option(help="Only these statuses.")] = None,
        pipeline: Annotated[str | None, typer.Option(help="Only this pipeline's runs.")] = None,
        limit: Annotated[int, typer.Option(min=1, max=10_000)] = 50,
        as_json: Annotated[bool, typer.Option("--json", help="JSON lines, one run each.")] = False,
        api_url: ApiUrl = None,
        key: Key = None,
    ) -> None:
        """Your runs, newest first."""

        def body() -> None:
            api = _connect(api_url, key)
            for run in api.all_runs(limit=limit, status=status or [], pipeline=pipeline):
                if as_json:
                    say(json.dumps(run))
                    continue
                p = run["progress"]
                progress = f"{p['step']}/{p['total']}" if p["total"] else "-"
                acc = "-" if run["final_accuracy"] is None else f"{run['final_accuracy']:.3f}"
                kl = "-" if run["kl_spent"] is None else f"{run['kl_spent']:.4f}"
                say(
                    f"{run['id']}  {run['status']:<9}  {run['kind']:<6}  {progress:>9}  "
                    f"acc {acc:>5}  KL {kl:>6}  {run['name']}"
                )

        _calling(body)

    @app.command()
    def logs(
        run_id: Annotated[str, typer.Argument(metavar="RUN", help="The run's id.")],
        follow: Annotated[
            bool, typer.Option("--follow", "-f", help="Keep printing until it ends.")
        ] = False,
        api_url: ApiUrl = None,
        key: Key = None,
    ) -> None:
        """A run's metrics, a line per step (live with --follow), and its status changes."""

        def body() -> None:
            api = _connect(api_url, key)
            if not follow:
                series = api.metrics(run_id, names=SHOWN, max_points=100_000)["series"]
                _print_steps(
                    (step, s["name"], value)
                    for s in series
                    for step, value in zip(s["steps"], s["values"], strict=True)
                )
                run = api.run(run_id)
                say(f"status {run['status']}")
                return
            for event, data in api.stream(run_id):
                if event == "status":
                    say(f"status {data['status']} (attempt {data['attempt']})")
                elif event == "metrics":
                    _print_steps((p["step"], p["name"], p["value"]) for p in data["points"])

        _calling(body)

    @app.command()
    def download(
        run_id: Annotated[str, typer.Argument(metavar="RUN", help="The run's id.")],
        out_dir: Annotated[Path, typer.Option("--out", help="Where the model folder goes.")],
        api_url: ApiUrl = None,
        key: Key = None,
    ) -> None:
        """Download a run's latest checkpoint (resumable; every file's sha256 verified)."""

        def body() -> None:
            api = _connect(api_url, key)
            checkpoints = api.checkpoints(run_id)
            if not checkpoints:
                _fail(f"run {run_id} has no checkpoint (yet)", 2)
            latest = max(checkpoints, key=lambda c: c["step"])
            folder = api.download_checkpoint(latest["id"], out_dir)
            say(f"{folder}  ({latest['role']}, step {latest['step']}, sha256 {latest['sha256']})")

        _calling(body)
