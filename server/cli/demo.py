"""`erpd-hub demo` (`make demo`): the embedded stack, the built-in demo pipeline submitted over REST
with the Python client, and its progress printed until the student exists.

Then the student is downloaded (sha256-verified) and a table of base, teachers and student is
printed, and the stack keeps running for the user to explore until Ctrl-C. `--no-wait` (CI) stops
it and exits once the pipeline succeeded; `--api-url` follows the same steps against a stack
that is already running (a production deployment) instead of starting one.

The submission carries an idempotency key derived from the pipeline, so running the demo again
on the same data dir shows the pipeline it already ran instead of training another
(`--again` submits a new one).
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
import time
import traceback
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from erpd import metrics as M
from erpd_hub.client import ApiClient, ApiError
from server.cli.app import Key, app, connect, err, fail, guarded, load_spec, run_stack, say
from server.settings import get_settings

if TYPE_CHECKING:
    from server.stack import Stack

# The calibrated defaults (docs/method.md; the API's own defaults), written out: the built-in
# two-digit addition task and tiny Llama, 128 prompts x 8 responses, one SAPO teacher
# over-trained for 20 epochs, one student distilling its extreme-region log-ratios.
DEMO_PIPELINE: dict[str, Any] = {
    "name": "demo",
    "tags": ["demo"],
    "model": "tiny",
    "dataset": "arithmetic",
    "sample": {"num_prompts": 128, "group_size": 8},
    "teachers": [{"objective": "sapo", "epochs": 20, "lr": 1.0e-4}],
    "stage2": {
        "signal": "logratio",
        "region": "top_frac",
        "top_frac": 0.2,
        "epochs": 2,
        "lr": 3.0e-5,
        "kl_coef": 0.01,
        "kl_budget": 0.1,
    },
}
FINISHED = {"succeeded", "failed", "cancelled"}


class DemoError(Exception):
    """A run of the demo pipeline failed or was cancelled (the message names it and why)."""


def role(run: dict[str, Any], rounds: int) -> str:
    """How the demo names a run: sample, teacher <objective>, student (with the round if > 1)."""
    if run["kind"] == "sample":
        name = "sample"
    elif run["kind"] == "stage1":
        stage = run["config"].get("stage", {})
        name = f"teacher {stage.get('name') or stage.get('objective', '')}".strip()
    else:
        name = "student"
    return f"round {run['round']} {name}" if rounds > 1 else name


def _fmt(value: float | None, spec: str = ".3f") -> str:
    return "-" if value is None else format(value, spec)


@dataclass
class Follower:
    """Submits the pipeline, prints each run's progress in order, downloads the student."""

    api: ApiClient
    body: dict[str, Any]
    out_dir: Path
    say: Callable[[str], None]
    again: bool = False
    student_dir: Path | None = None
    error: str | None = None
    done: threading.Event = field(default_factory=threading.Event)

    def idempotency_key(self) -> str:
        digest = hashlib.sha256(json.dumps(self.body, sort_keys=True).encode()).hexdigest()[:24]
        return f"demo-{digest}" if not self.again else f"demo-{digest}-{uuid.uuid4().hex}"

    def run(self) -> None:
        """The whole follow; never raises (the outcome is in `error` / `student_dir`)."""
        try:
            self.student_dir = self._follow()
        except DemoError as exc:
            self.error = str(exc)
        except ApiError as exc:
            where = f" (field {exc.field})" if exc.field else ""
            self.error = f"{exc.message}{where}"
        except Exception as exc:  # a bug: one line, like every erpd-hub error
            if os.environ.get("ERPD_DEBUG"):
                traceback.print_exc()
            self.error = f"internal error: {type(exc).__name__}: {exc}"
        finally:
            self.done.set()

    def _follow(self) -> Path:
        made = self.api.submit_pipeline(self.body, idempotency_key=self.idempotency_key())
        rounds = int(made.get("rounds", 1))
        self.say(f"pipeline {made['id']} ({made['name']}): {len(made['runs'])} runs")
        runs = []
        for run_id in made["runs"]:
            runs.append(self._follow_run(run_id, rounds))
        student = runs[-1]
        checkpoints = self.api.checkpoints(student["id"])
        if not checkpoints:
            raise DemoError(f"the student {student['id']} succeeded without a checkpoint")
        latest = max(checkpoints, key=lambda c: c["step"])
        folder = self.api.download_checkpoint(latest["id"], self.out_dir)
        self._table(runs, rounds)
        self.say(f"student downloaded to {folder} (sha256 {latest['sha256'][:16]}..., verified)")
        self.say(f"  load it with AutoModelForCausalLM.from_pretrained({str(folder)!r})")
        return folder

    def _follow_run(self, run_id: str, rounds: int) -> dict[str, Any]:
        run = self.api.run(run_id)
        label = role(run, rounds)
        latest: dict[str, float | None] = {}
        total = run["progress"].get("total")
        last_status, last_step = None, -1
        while run["status"] not in FINISHED:  # a stream the server closed is opened again
            for event, data in self.api.stream(run_id, since_step=last_step):
                if event == "status":
                    total = data.get("total") or total
                    if data["status"] != last_status and data["status"] not in FINISHED:
                        self.say(f"[{label}] {data['status']}")  # the end has its own line
                    last_status = data["status"]
                elif event == "metrics" and data["points"]:
                    self._progress(label, data["points"], latest, total)
                    last_step = max(last_step, *(p["step"] for p in data["points"]))
            run = self.api.run(run_id)
        if run["status"] != "succeeded":
            reason = f": {run['error']}" if run.get("error") else ""
            raise DemoError(
                f"{label} run {run_id} {run['status']}{reason} (running the demo again shows "
                "this pipeline again; --again, or DEMO_ARGS=--again, submits a new one)"
            )
        if run["kind"] == "sample":
            reward = run["summary"].get(M.REWARD_MEAN)
            self.say(f"[{label}] succeeded: mean reward of the fixed batch {_fmt(reward)}")
        else:
            self.say(
                f"[{label}] succeeded: accuracy {_fmt(run['final_accuracy'])}, "
                f"KL to the base {_fmt(run['kl_spent'], '.4f')}, entropy {_fmt(run['entropy'])}"
            )
        return run

    def _progress(
        self,
        label: str,
        points: list[dict[str, Any]],
        latest: dict[str, float | None],
        total: int | None,
    ) -> None:
        """A line per evaluation (every few epochs): step, accuracy, KL and entropy so far."""
        evals = []
        for p in sorted(points, key=lambda p: p["step"]):
            latest[p["name"]] = p["value"]
            if p["name"] == M.ACC_EVAL:
                evals.append((p["step"], dict(latest)))
        for step, seen in evals:
            of = f"/{total}" if total else ""
            self.say(
                f"[{label}] step {step}{of}: eval accuracy {_fmt(seen.get(M.ACC_EVAL))}, "
                f"KL {_fmt(seen.get(M.KL_EXACT), '.4f')}, "
                f"entropy {_fmt(seen.get(M.ENTROPY_TOKEN))}"
            )

    def _table(self, runs: list[dict[str, Any]], rounds: int) -> None:
        """Base, teachers and student side by side, and the headline comparison."""
        rows: list[tuple[str, float | None, float | None, float | None, float | None]] = []
        first_teacher = next((r for r in runs if r["kind"] == "stage1"), None)
        if first_teacher is not None:  # the base: the first teacher's evaluation at step 0
            names = [M.ACC_EVAL, M.ACC_EVAL_SAMPLED]
            at_zero = self.api.values_at(first_teacher["id"], names, 0)
            if at_zero:
                rows.append(
                    ("base", at_zero.get(M.ACC_EVAL), at_zero.get(M.ACC_EVAL_SAMPLED), 0.0, None)
                )
        for r in runs:
            if r["kind"] != "sample":
                sampled = r["summary"].get(M.ACC_EVAL_SAMPLED)
                rows.append(
                    (role(r, rounds), r["final_accuracy"], sampled, r["kl_spent"], r["entropy"])
                )
        width = max(len(row[0]) for row in rows)
        self.say(f"{'':{width}}  acc greedy  acc sampled  KL to base  entropy")
        for name, greedy, sampled, kl, ent in rows:
            self.say(
                f"{name:{width}}  {_fmt(greedy):>10}  {_fmt(sampled):>11}  "
                f"{_fmt(kl, '.4f'):>10}  {_fmt(ent):>7}"
            )
        teachers = [r for r in runs if r["kind"] == "stage1" and r["kl_spent"]]
        student = runs[-1]
        if teachers and student["kl_spent"] is not None and student["final_accuracy"] is not None:
            best = max(teachers, key=lambda r: r["final_accuracy"] or 0.0)
            share = student["kl_spent"] / best["kl_spent"]
            self.say(
                f"The student reaches accuracy {student['final_accuracy']:.3f} "
                f"(best teacher: {_fmt(best['final_accuracy'])}) at {share:.0%} of that "
                "teacher's KL to the base."
            )


@app.command()
@guarded
def demo(
    no_wait: Annotated[
        bool, typer.Option("--no-wait", help="Exit once the pipeline succeeded (CI mode).")
    ] = False,
    out_dir: Annotated[
        Path, typer.Option("--out", help="Where the student's model folder goes.")
    ] = Path("runs/demo"),
    pipeline: Annotated[
        Path | None,
        typer.Option(help="Another pipeline (YAML, as `erpd-hub submit` takes)."),
    ] = None,
    again: Annotated[
        bool, typer.Option("--again", help="Submit a new pipeline even if one ran.")
    ] = False,
    api_url: Annotated[
        str | None,
        typer.Option("--api-url", help="A running deployment's API (.../api/v1): no local stack."),
    ] = None,
    key: Key = None,
    gpus: Annotated[
        str | None, typer.Option(help="GPU indices for the worker, e.g. 0,1. None = CPU.")
    ] = None,
    dashboard_port: Annotated[
        int, typer.Option(envvar="ERPD_DASHBOARD_PORT", help="Dashboard port.")
    ] = 8501,
) -> None:
    """Start the embedded stack (unless --api-url names a running one), run the demo ERPD
    pipeline through it and download the student; the stack then runs until Ctrl-C."""
    spec = load_spec(pipeline) if pipeline else DEMO_PIPELINE
    if "kind" in spec:
        fail(f"{pipeline}: a pipeline, not a run (no `kind`), is what the demo runs", 2)
    if api_url:  # a running stack (production): just the client's part
        follower = Follower(connect(api_url, key), spec, out_dir, say, again)
        follower.run()
        if follower.error:
            fail(follower.error)
        return
    _on_a_local_stack(
        spec, out_dir, again=again, no_wait=no_wait, gpus=gpus, dashboard_port=dashboard_port
    )


def _on_a_local_stack(
    spec: dict[str, Any],
    out_dir: Path,
    *,
    again: bool,
    no_wait: bool,
    gpus: str | None,
    dashboard_port: int,
) -> None:
    """Follow the pipeline from a thread while the stack is supervised here; the follow's
    outcome, or a signal, decides how the command ends."""
    started: list[Follower] = []
    stacks: list[Stack] = []

    def on_up(stack: Stack) -> None:
        say("\n".join([*stack.banner, f"  logs       {stack.supervisor.log_dir}/"]))
        follower = Follower(ApiClient(stack.api_url, stack.key), spec, out_dir, say, again)
        started.append(follower)
        stacks.append(stack)

        def follow() -> None:
            follower.run()
            if follower.error:
                # a child that died (and broke the stream) is what to report: give the
                # supervisor's watch a moment to find it before stopping
                time.sleep(1.0)
            if no_wait or follower.error:
                stack.supervisor.stopping.set()
            else:
                say("The stack keeps running: explore it; Ctrl-C stops everything.")

        threading.Thread(target=follow, name="demo-follow", daemon=True).start()

    run_stack(
        on_up,
        gpus=gpus,
        dashboard_port=dashboard_port,
        reap_every=2.0,
        log_dir=get_settings().home / "logs",
    )
    ran = started[0] if started else None
    if ran is not None and ran.error and not stacks[0].supervisor.signalled:
        fail(ran.error)
    if ran is not None and ran.student_dir is None:
        err.print(
            "erpd-hub: stopped before the pipeline finished; the same command follows it again "
            "(a stage that was cut off is requeued once the reaper finds it silent, after "
            f"{get_settings().heartbeat_timeout_s:.0f} s)",
            highlight=False,
            soft_wrap=True,
        )
    else:
        err.print("erpd-hub: stopped", highlight=False)
