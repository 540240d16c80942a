"""`erpd-hub submit | runs | logs | pipeline | download`: the CLI verbs over the REST API
(erpd_hub/client.py).

They reach the API at `--api-url` (ERPD_API_URL, default this machine's ERPD_PORT) with `--key`
(ERPD_API_KEY, else the key `erpd-hub up` keeps in $ERPD_HOME/api-key).
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Iterable
from pathlib import Path
from typing import Annotated

import typer

from erpd import metrics as M
from erpd.control_table import format_table
from server.cli.app import ApiUrl, Key, app, connect, fail, guarded, load_spec, say

# the metrics `logs` prints per step, when a run has them
SHOWN = [M.LOSS, M.KL_EXACT, M.KL_K3, M.ENTROPY_TOKEN, M.ACC_TRAIN_BATCH, M.ACC_EVAL]


def _line(step: int, values: dict[str, float | None]) -> str:
    shown = [f"{name}={values[name]:.4g}" for name in SHOWN if values.get(name) is not None]
    return f"step {step:>6}  " + "  ".join(shown)


def _print_steps(points: Iterable[tuple[int, str, float | None]]) -> None:
    """One line per step that has any of the SHOWN metrics, in step order."""
    by_step: dict[int, dict[str, float | None]] = defaultdict(dict)
    for step, name, value in points:
        by_step[step][name] = value
    for step in sorted(by_step):
        if any(name in by_step[step] for name in SHOWN):
            say(_line(step, by_step[step]))


@app.command()
@guarded
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
    control: Annotated[
        list[str] | None,
        typer.Option(
            "--control",
            help="Run this matched control beside each round's student (repeat for more: "
            "advantage_region, advantage_random, placebo, early_stop); added to the file's "
            "`controls`.",
        ),
    ] = None,
) -> None:
    """Submit a pipeline (or a single run) described in a YAML or JSON file."""
    data = load_spec(spec)
    if control:
        if "kind" in data:
            fail("--control: a single run has no controls; submit a pipeline", 2)
        have = data.get("controls") or []
        if not isinstance(have, list):
            fail(f"{spec}: controls must be a list", 2)
        data["controls"] = have + [c for c in control if c not in have]
    api = connect(api_url, key)
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


@app.command()
@guarded
def runs(
    status: Annotated[list[str] | None, typer.Option(help="Only these statuses.")] = None,
    pipeline: Annotated[str | None, typer.Option(help="Only this pipeline's runs.")] = None,
    limit: Annotated[int, typer.Option(min=1, max=10_000)] = 50,
    as_json: Annotated[bool, typer.Option("--json", help="JSON lines, one run each.")] = False,
    api_url: ApiUrl = None,
    key: Key = None,
) -> None:
    """Your runs, newest first."""
    api = connect(api_url, key)
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


@app.command()
@guarded
def logs(
    run_id: Annotated[str, typer.Argument(metavar="RUN", help="The run's id.")],
    follow: Annotated[
        bool, typer.Option("--follow", "-f", help="Keep printing until it ends.")
    ] = False,
    api_url: ApiUrl = None,
    key: Key = None,
) -> None:
    """A run's metrics, a line per step (live with --follow), and its status changes."""
    api = connect(api_url, key)
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


@app.command()
@guarded
def pipeline(
    pipeline_id: Annotated[str, typer.Argument(metavar="PIPELINE", help="The pipeline's id.")],
    as_json: Annotated[bool, typer.Option("--json", help="The API's JSON, as is.")] = False,
    api_url: ApiUrl = None,
    key: Key = None,
) -> None:
    """A pipeline's runs by round and role, and the student against each matched control:
    accuracy ± standard error, student - control with its 95% interval, and the verdict."""
    api = connect(api_url, key)
    detail = api.get(f"/pipelines/{pipeline_id}")
    if as_json:
        say(json.dumps(detail, indent=2))
        return
    controls = ", ".join(detail["controls"]) or "none"
    say(
        f"pipeline {detail['id']}  {detail['name']}  rounds {detail['rounds']}  controls {controls}"
    )
    for r in detail["by_round"]:
        for run in r["runs"]:
            role = f"control {run['control']}" if run["control"] else run["role"]
            say(f"  r{r['round']} {role:<26} {run['status']:<9}  {run['id']}  {run['name']}")
        if r["comparisons"]:
            for line in format_table(r):
                say(line)
    if any(r["comparisons"] for r in detail["by_round"]):
        say(
            "intervals: diff ± 1.96·sqrt(se_student² + se_control²), evaluation sampling on one "
            "seed (conservative: both arms are scored on the same problems)"
        )


@app.command()
@guarded
def download(
    run_id: Annotated[str, typer.Argument(metavar="RUN", help="The run's id.")],
    out_dir: Annotated[Path, typer.Option("--out", help="Where the model folder goes.")],
    api_url: ApiUrl = None,
    key: Key = None,
) -> None:
    """Download a run's latest checkpoint (resumable; every file's sha256 verified)."""
    api = connect(api_url, key)
    checkpoints = api.checkpoints(run_id)
    if not checkpoints:
        fail(f"run {run_id} has no checkpoint (yet)", 2)
    latest = max(checkpoints, key=lambda c: c["step"])
    folder = api.download_checkpoint(latest["id"], out_dir)
    say(f"{folder}  ({latest['role']}, step {latest['step']}, sha256 {latest['sha256']})")
