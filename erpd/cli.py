"""`erpd`: the training core from the command line.

Every command reads the same pipeline-shaped config (YAML or JSON, all sections optional) plus
`--set section.field=value` overrides, validated by erpd.config. Input errors print one line naming
the field and exit 2; Ctrl-C stops cooperatively (a resume checkpoint is written; run the same
command again to continue), a second Ctrl-C aborts.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal, NoReturn

import typer
import yaml
from pydantic import ValidationError
from rich.console import Console
from rich.table import Table

from erpd.config import PipelineConfig
from erpd.errors import ERPDError

if TYPE_CHECKING:
    from erpd.spec import StageSpec

app = typer.Typer(
    name="erpd",
    help="Extreme Region Policy Distillation: base, sample, stage1, stage2, pipeline, eval, "
    "reproduce.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
out_console = Console()
err_console = Console(stderr=True)

ConfigOpt = Annotated[
    Path | None, typer.Option("--config", "-c", help="YAML/JSON config (pipeline-shaped).")
]
SetOpt = Annotated[
    list[str] | None,
    typer.Option("--set", "-s", help="Override a field: section.field=value (YAML value)."),
]
DeviceOpt = Annotated[str | None, typer.Option(help="auto | cpu | cuda (runtime.device).")]
OutOpt = Annotated[Path, typer.Option("--out", "-o", help="Output directory.")]
ModelOpt = Annotated[Path, typer.Option("--model", "-m", help="Local model directory (pi_k).")]
BatchOpt = Annotated[Path, typer.Option("--batch", "-b", help="RolloutBatch directory.")]


class UsageError(ERPDError):
    exit_code = 2


# --- config loading -------------------------------------------------------------------------
def _read_config_file(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise UsageError(f"--config: no such file {path}")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))  # YAML is a superset of JSON
    except UnicodeDecodeError as exc:
        raise UsageError(f"--config: {path}: not UTF-8 text") from exc
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        raise UsageError(f"--config: {path}{where}: not valid YAML/JSON") from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UsageError(f"--config: {path}: the top level must be a mapping")
    return data


_MAX_NEW_LIST_ENTRIES = 64  # --set may create list entries (teachers.2.objective) up to here


def set_path(data: dict[str, Any], key: str, value: Any) -> None:
    """data[a][b][0][c] = value for key 'a.b.0.c', creating sections and list entries."""
    parts = key.split(".")
    node: Any = data
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        nxt: Any = value if last else ([] if parts[i + 1].isdigit() else {})
        if isinstance(node, list):
            if not part.isdigit():
                raise UsageError(f"--set {key}: {part!r} must be a list index")
            idx = int(part)
            if idx > max(len(node), _MAX_NEW_LIST_ENTRIES):  # a huge index is a typo
                raise UsageError(f"--set {key}: list index {idx} is past the end ({len(node)})")
            while len(node) <= idx:
                node.append({})
            if last:
                node[idx] = value
            node = node[idx]
        elif isinstance(node, dict):
            if last or part not in node or not isinstance(node[part], dict | list):
                node[part] = nxt
            node = node[part]
        else:
            raise UsageError(f"--set {key}: {'.'.join(parts[:i])} is not a section")


def apply_override(data: dict[str, Any], assignment: str) -> None:
    """Apply one 'a.b.0.c=value' override; the value is parsed as YAML (numbers, lists, ...)."""
    key, sep, raw = assignment.partition("=")
    if not sep or not key:
        raise UsageError(f"--set {assignment!r}: expected section.field=value")
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError as exc:
        raise UsageError(f"--set {key}: value is not valid YAML") from exc
    set_path(data, key, value)


def _format_validation(exc: ValidationError) -> str:
    err = exc.errors()[0]
    field = ".".join(str(p) for p in err["loc"]) or "config"
    msg = err["msg"].removeprefix("Value error, ")
    more = f" (and {exc.error_count() - 1} more)" if exc.error_count() > 1 else ""
    return f"config field '{field}': {msg}{more}"


def load_config(config: Path | None, overrides: list[str] | None, **fixed: Any) -> PipelineConfig:
    """File -> overrides -> explicit flags (non-None), validated as one PipelineConfig."""
    data = _read_config_file(config) if config else {}
    for assignment in overrides or []:
        apply_override(data, assignment)
    for key, value in fixed.items():
        if value is not None:
            set_path(data, key, value)
    return PipelineConfig.model_validate(data)


def existing_dir(path: Path, option: str) -> Path:
    """Fail fast, before torch is even imported, on a directory that is not there."""
    if not path.is_dir():
        raise UsageError(f"{option}: no such directory {path}")
    return path


def require_dirs(**options: Path | None) -> None:
    """existing_dir for each given option (keyword = option name without dashes)."""
    for name, path in options.items():
        if path is not None:
            existing_dir(path, f"--{name}")


def output_dir(out: Path) -> Path:
    """--out may be new or a directory; never a file (it would be replaced)."""
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out: {out} exists and is not a directory")
    return out


# --- running a command ----------------------------------------------------------------------
def _fail(message: str, code: int) -> NoReturn:
    err_console.print(f"[bold red]error:[/bold red] {message}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


@contextmanager
def _graceful_stop() -> Iterator[Callable[[], bool]]:
    """First Ctrl-C/SIGTERM asks the loop to save and stop; a second one interrupts."""
    requested = {"stop": False}
    previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}

    def handler(signum: int, frame: object) -> None:
        if requested["stop"]:
            raise KeyboardInterrupt
        requested["stop"] = True
        err_console.print("[yellow]stopping after this step (resume checkpoint) ...[/yellow]")

    for s in previous:
        signal.signal(s, handler)
    try:
        yield lambda: requested["stop"]
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def _guard(fn: Callable[[], None]) -> None:
    try:
        fn()
    except ValidationError as exc:
        _fail(_format_validation(exc), 2)
    except ERPDError as exc:
        _fail(str(exc), exc.exit_code)
    except KeyboardInterrupt:
        _fail("interrupted", 130)
    except typer.Exit:
        raise
    except Exception as exc:  # a bug, not bad input: one line, traceback on request
        if os.environ.get("ERPD_DEBUG"):
            raise
        _fail(f"internal error: {type(exc).__name__}: {exc} (set ERPD_DEBUG=1 for a traceback)", 1)


def _env(cfg: PipelineConfig, out: Path | None, should_stop: Callable[[], bool] | None = None):
    from erpd import distributed
    from erpd import metrics as M
    from erpd.progress import RichProgress, no_progress
    from erpd.stage import StageEnv

    env = StageEnv.of(cfg, progress=RichProgress())
    env.should_stop = should_stop
    if not distributed.is_main():  # under torchrun, rank 0 alone reports
        env.progress = no_progress
        return env
    _show_memory_estimate()
    sinks: list[M.MetricSink] = [M.ConsoleSink(err_console)]
    if out is not None:
        sinks.append(M.JsonlSink(out / "metrics.jsonl"))
    env.sink = M.TeeSink(*sinks)
    return env


class _DimLine(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        err_console.print(record.getMessage(), style="dim", highlight=False, soft_wrap=True)


def _show_memory_estimate() -> None:
    """The estimate a stage makes before loading (erpd.stage's one log line), on stderr."""
    stage_log = logging.getLogger("erpd.stage")
    if not any(isinstance(h, _DimLine) for h in stage_log.handlers):
        stage_log.addHandler(_DimLine())
        stage_log.setLevel(logging.INFO)


def _fmt(v: object) -> str:
    return f"{v:.3f}" if isinstance(v, float) else "-" if v is None else str(v)


def print_rows(rows: list[dict[str, Any]], title: str) -> None:
    """The base / teacher / student table; fits an 80-column terminal."""
    table = Table(title=title)
    cols = ["round", "name", "acc_eval", "acc_eval_sampled", "kl_exact", "entropy", "steps"]
    heads = ["round", "policy", "acc greedy", "acc T=1", "KL exact", "entropy", "steps"]
    for h in heads:
        table.add_column(h, justify="left" if h == "policy" else "right", no_wrap=True)
    for row in rows:
        shown = {**row, "name": str(row.get("name", "")).split("/")[-1]}
        table.add_row(*(_fmt(shown.get(c)) for c in cols))
    out_console.print(table)


def _spec(
    cfg: PipelineConfig,
    stage: Literal["stage1", "stage2"],
    config: dict[str, Any],
    *,
    paths: dict[str, Path | None],
    fresh: bool,
    out: Path,
    run: str,
    teachers: list[Path] | None = None,
) -> StageSpec:
    """One stage of the command: pi_k = --model on the --batch (`paths`, with --initial)."""
    from erpd.spec import StageSpec

    initial = paths["initial"]
    return StageSpec(
        stage=stage,
        pipeline=cfg.model_dump(mode="json"),
        config=config,
        pi_k=str(paths["model"]),
        pi_0=None if initial is None else str(initial),
        batch=str(paths["batch"]),
        run_dir=str(out),
        run=run,
        teachers=[str(t) for t in teachers or []],
        resume=not fresh,
    )


# --- commands -------------------------------------------------------------------------------
# Each command validates its config and paths first, then imports torch: a typo costs 0.5 s.
@app.command()
def pipeline(
    out: OutOpt = Path("runs/pipeline"),
    config: ConfigOpt = None,
    set_: SetOpt = None,
    device: DeviceOpt = None,
    rounds: Annotated[int | None, typer.Option(help="ERPD rounds.")] = None,
    model: Annotated[
        Path | None, typer.Option(help="Local base model dir (default: tiny).")
    ] = None,
) -> None:
    """Run whole ERPD rounds (base -> sample -> teachers -> student) and print the summary."""

    def go() -> None:
        fixed = {"runtime.device": device, "rounds": rounds}
        if model is not None:
            fixed["model.path"] = str(existing_dir(model, "--model"))
        cfg = load_config(config, set_, **fixed)
        output_dir(out)
        from dataclasses import asdict

        from erpd import metrics as M
        from erpd.pipeline import run_pipeline
        from erpd.progress import RichProgress

        with _graceful_stop() as stop:
            res = run_pipeline(
                cfg, out, sink=M.ConsoleSink(err_console), progress=RichProgress(), should_stop=stop
            )
        print_rows([asdict(r) for r in res.rows], f"ERPD pipeline ({res.status})")
        from erpd.control_table import format_table

        for table in res.controls:  # the student against each matched control, if any
            out_console.print("\n".join(format_table(table.as_dict())), markup=False)
        out_console.print(f"student checkpoint: {res.student}")
        out_console.print(f"metrics:            {res.metrics}")
        out_console.print(f"summary:            {res.summary}")
        out_console.print(f"wall time:          {res.wall_time:.1f} s")
        if res.status == "stopped":
            _fail("stopped; run the same command again to resume", 3)

    _guard(go)


@app.command()
def base(
    out: OutOpt,
    config: ConfigOpt = None,
    set_: SetOpt = None,
    device: DeviceOpt = None,
) -> None:
    """Build the tiny model and pretrain it to a partial accuracy (base.target_acc)."""

    def go() -> None:
        cfg = load_config(config, set_, **{"runtime.device": device})
        output_dir(out)
        from erpd.pretrain import pretrain_base

        with _graceful_stop() as stop:
            env = _env(cfg, out, stop)
            res = pretrain_base(
                shape=cfg.model.tiny, cfg=cfg.base, env=env, out_dir=out, seed=cfg.runtime.seed
            )
        env.sink.close()
        out_console.print(f"base checkpoint: {res.checkpoint} (sha256 {res.sha256})")
        _print_summary(res.summary)

    _guard(go)


@app.command()
def sample(
    model: ModelOpt,
    out: OutOpt,
    config: ConfigOpt = None,
    set_: SetOpt = None,
    device: DeviceOpt = None,
    round_: Annotated[int, typer.Option("--round", help="Round index (seeds the draw).")] = 0,
) -> None:
    """Sample the fixed RolloutBatch (N prompts x G responses) from pi_k."""

    def go() -> None:
        cfg = load_config(config, set_, **{"runtime.device": device})
        require_dirs(model=model)
        from erpd.checkpoint import check_replaceable
        from erpd.rollout import ROLLOUT_META
        from erpd.spec import sample_batch

        check_replaceable(out, ROLLOUT_META)  # before sampling, not after

        batch = sample_batch(model, out, cfg, _env(cfg, None), round_)
        out_console.print(
            f"rollout batch: {out} ({len(batch)} responses, mean reward "
            f"{batch.rewards.mean().item():.3f}, {batch.num_response_tokens} response tokens)"
        )

    _guard(go)


@app.command()
def stage1(
    model: ModelOpt,
    batch: BatchOpt,
    out: OutOpt,
    config: ConfigOpt = None,
    set_: SetOpt = None,
    device: DeviceOpt = None,
    initial: Annotated[Path | None, typer.Option(help="pi_0 (mse_reference=initial).")] = None,
    fresh: Annotated[bool, typer.Option(help="Ignore resume checkpoints.")] = False,
) -> None:
    """Train every configured teacher on the batch -> OUT/teacher-NAME/checkpoint."""

    def go() -> None:
        cfg = load_config(config, set_, **{"runtime.device": device})
        require_dirs(model=model, batch=batch, initial=initial)
        output_dir(out)
        from erpd.rollout import RolloutBatch

        fixed = RolloutBatch.load(batch)
        with _graceful_stop() as stop:
            env = _env(cfg, out, stop)
            paths = {"model": model, "batch": batch, "initial": initial}
            for t in cfg.teachers:
                name = f"teacher-{t.label}"
                spec = _spec(
                    cfg,
                    "stage1",
                    t.model_dump(),
                    paths=paths,
                    fresh=fresh,
                    out=out / name,
                    run=name,
                )
                _report(spec.run_stage(env, fixed))
        env.sink.close()

    _guard(go)


@app.command()
def stage2(
    model: ModelOpt,
    batch: BatchOpt,
    out: OutOpt,
    teacher: Annotated[
        list[Path] | None, typer.Option("--teacher", "-t", help="Teacher checkpoint (repeat).")
    ] = None,
    config: ConfigOpt = None,
    set_: SetOpt = None,
    device: DeviceOpt = None,
    initial: Annotated[Path | None, typer.Option(help="pi_0 (signal=contrast).")] = None,
    fresh: Annotated[bool, typer.Option(help="Ignore resume checkpoints.")] = False,
) -> None:
    """Distil the teachers into pi_k under the trust region -> OUT/checkpoint."""

    def go() -> None:
        cfg = load_config(config, set_, **{"runtime.device": device})
        teachers = [existing_dir(t, "--teacher") for t in teacher or []]
        if not teachers and cfg.stage2.signal != "advantage":
            raise UsageError("--teacher: at least one is needed unless stage2.signal=advantage")
        from erpd.stage2 import check_inputs

        check_inputs(cfg.stage2, len(teachers))  # e.g. a teacher's region with no teacher
        require_dirs(model=model, batch=batch, initial=initial)
        output_dir(out)
        from erpd.rollout import RolloutBatch

        fixed = RolloutBatch.load(batch)
        spec = _spec(
            cfg,
            "stage2",
            cfg.stage2.model_dump(),
            paths={"model": model, "batch": batch, "initial": initial},
            fresh=fresh,
            out=out,
            run="student",
            teachers=teachers,
        )
        with _graceful_stop() as stop:
            env = _env(cfg, out, stop)
            res = spec.run_stage(env, fixed)
        env.sink.close()
        _report(res)

    _guard(go)


@app.command("eval")
def eval_(
    model: ModelOpt,
    config: ConfigOpt = None,
    set_: SetOpt = None,
    device: DeviceOpt = None,
    batch: Annotated[Path | None, typer.Option(help="Also: KL/entropy on this batch.")] = None,
    reference: Annotated[Path | None, typer.Option(help="pi_k for KL (default: none).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Greedy and sampled held-out accuracy (and KL/entropy on a batch against a reference)."""

    def go() -> None:
        cfg = load_config(config, set_, **{"runtime.device": device})
        require_dirs(model=model, batch=batch, reference=reference)
        from erpd.models import load_model, load_policy, tokenizer_fingerprint
        from erpd.rollout import RolloutBatch

        env = _env(cfg, None)
        policy, tokenizer = load_policy(model, env.device)
        pi_k = load_model(reference, env.device) if reference else None
        fixed = RolloutBatch.load(batch) if batch else None
        if fixed is not None:
            fixed.check_model(
                policy.config.vocab_size, str(model), tokenizer_fingerprint(tokenizer)
            )
            if pi_k is not None and reference is not None:
                fixed.check_model(pi_k.config.vocab_size, str(reference))
        values = env.evaluator(tokenizer, cfg.runtime.seed)(policy, step=0, pi_k=pi_k, batch=fixed)
        if as_json:
            out_console.print_json(json.dumps(values))
        else:
            _print_summary(values)

    _guard(go)


@app.command()
def reproduce(
    out: OutOpt = Path("runs/reproduce"),
    preset_: Annotated[
        str, typer.Option("--preset", help="quick (~35 min on 2 cores) or full (4 seeds, ~85 min).")
    ] = "quick",
    seeds: Annotated[int | None, typer.Option(help="Fixed batches per experiment.")] = None,
    config: Annotated[
        Path | None, typer.Option("--config", "-c", help="YAML/JSON reproduce config.")
    ] = None,
    set_: SetOpt = None,
    device: DeviceOpt = None,
    model: Annotated[
        Path | None, typer.Option(help="Local HF model dir as pi_0 (default: tiny).")
    ] = None,
    dataset: Annotated[
        Path | None, typer.Option(help="JSONL dataset: the strong-teacher experiment runs on it.")
    ] = None,
) -> None:
    """The paper's experiments at tiny scale -> OUT/report.md, plots, results.json."""

    def go() -> None:
        from erpd.reproduce import ReproduceConfig, preset, run_reproduce

        if preset_ not in ("quick", "full"):
            raise UsageError(f"--preset: must be quick or full, got {preset_!r}")
        data = _merge(preset(preset_), _read_config_file(config) if config else {})  # type: ignore[arg-type]
        for assignment in set_ or []:
            apply_override(data, assignment)
        fixed = {"seeds": seeds, "runtime.device": device}
        if model is not None:
            fixed["model.path"] = str(existing_dir(model, "--model"))
        for key, value in fixed.items():
            if value is not None:
                set_path(data, key, value)
        if dataset is not None:
            if model is None and "path" not in data.get("model", {}):
                raise UsageError("--dataset needs --model: the tiny base knows only arithmetic")
            if not dataset.is_file():
                raise UsageError(f"--dataset: no such file {dataset}")
            # added to the built-in tasks (or to the tasks a config/--set defined), keeping any
            # --set tasks.dataset.* knobs such as max_new_tokens
            tasks = data.setdefault("tasks", ReproduceConfig().model_dump(mode="json")["tasks"])
            jsonl = {"kind": "jsonl", "jsonl": {"train_path": str(dataset)}}
            tasks["dataset"] = _merge(tasks.get("dataset") or {}, jsonl)
        cfg = ReproduceConfig.model_validate(data)
        output_dir(out)
        from erpd.progress import RichProgress

        def log(line: str) -> None:
            err_console.print(line, highlight=False)

        with _graceful_stop() as stop:
            res = run_reproduce(
                cfg,
                out,
                command=f"erpd reproduce --preset {preset_}",
                progress=RichProgress(),
                should_stop=stop,
                log=log,
            )
        table = Table(title=f"ERPD claims ({cfg.preset} preset, {cfg.seeds} seeds)")
        for head in ("claim", "greedy", "sampled (T=1)"):
            table.add_column(head, no_wrap=True)
        for v in res.verdicts:
            table.add_row(v.claim, _outcome(v.outcome), _outcome(v.outcome_sampled))
        out_console.print(table)
        out_console.print(f"report:    {res.report}")
        out_console.print(f"results:   {res.results}")
        out_console.print(f"wall time: {res.wall_time / 60:.1f} min ({res.trained} runs trained)")

    _guard(go)


def _outcome(outcome: str) -> str:
    """A verdict's outcome (erpd/reproduce/verdicts.py), coloured."""
    colour = {"holds": "green", "does not hold": "red"}.get(outcome, "yellow")
    return f"[{colour}]{outcome}[/{colour}]"


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    """extra on top of base, section by section."""
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def _print_summary(values: dict[str, float]) -> None:
    table = Table(show_header=True)
    table.add_column("metric")
    table.add_column("value", justify="right")
    for k, v in values.items():
        table.add_row(k, f"{v:.4f}")
    out_console.print(table)


def _report(res: Any) -> None:
    from erpd import distributed

    if not distributed.is_main():
        return
    if res.status == "stopped":
        _fail(f"{res.run}: stopped at step {res.steps}; run again to resume", 3)
    out_console.print(
        f"{res.run}: {res.status} after {res.steps}/{res.total_steps} steps -> {res.checkpoint}"
    )
    _print_summary(res.summary)


def main() -> None:
    # distributed.launched(), read here without importing torch (a typo must stay cheap)
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        app(prog_name="erpd")
        return
    # a torchrun rank (`torchrun ... -m erpd.cli stage1 ...`): exits through exit_rank
    if sys.argv[1:2] not in (["stage1"], ["stage2"]):
        # the others write the same files from every rank
        err_console.print(
            "[bold red]error:[/bold red] under torchrun only `erpd stage1` and `erpd stage2` "
            "run (one process each)",
            highlight=False,
        )
        sys.exit(2)
    from erpd import distributed

    code = 0
    try:
        app(prog_name="erpd")
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else int(exc.code is not None)
    distributed.exit_rank(code)


if __name__ == "__main__":
    main()
