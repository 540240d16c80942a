"""What an API key may do to the run store: submit runs and pipelines within its quota, name the
models and datasets it may see, and act only on its own runs (another key's run reads as missing,
never as forbidden: ids of others' runs leak nothing).

Errors name fields as the API's clients send them (`teachers.0`, `batch_run`), not as the store
names its columns (`teacher_ids`, `batch_run_id`): these functions are where a request enters the
service layer, so the client can find the field it has to fix.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Sequence
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from server.db import ApiKey, Dataset, Model, Pipeline, RegistryKind, Run, RunKind, RunStatus
from server.run_configs import JSONL_EVAL_SIZE
from server.services.errors import (
    IllegalTransitionError,
    InvalidInputError,
    NotFoundError,
    QuotaExceededError,
)
from server.services.pipelines import create_pipeline, runs_per_pipeline
from server.services.registry import find, find_dataset
from server.services.runs import create_run, get_run, set_name_and_tags
from server.services.transitions import request_cancel, retry_run

# the store names ids, the API names the runs: errors report the field the client sent
_API_FIELDS = {"teacher_ids": "teachers", "batch_run_id": "batch_run", "base_run_id": "base_run"}


def check_quota(session: Session, *, owner_id: uuid.UUID, adding: int, limit: int) -> None:
    """QuotaExceededError past the key's active-run limit. The key's row is locked first, so one
    key's concurrent submissions count one after another (SQLite: BEGIN IMMEDIATE does the
    same)."""
    session.execute(select(ApiKey.id).where(ApiKey.id == owner_id).with_for_update())
    active = session.scalar(
        select(func.count())
        .select_from(Run)
        .where(Run.owner_id == owner_id, Run.status.in_([RunStatus.QUEUED, RunStatus.RUNNING]))
    )
    if (active or 0) + adding > limit:
        raise QuotaExceededError(f"{active} runs queued or running for this key (limit {limit})")


def resolve(
    session: Session, *, owner_id: uuid.UUID, model: str, dataset: str
) -> tuple[uuid.UUID, uuid.UUID]:
    """The ids behind the names a request gives: a registered model, and a dataset that is the
    key's own upload or a shared one."""
    found_model = find(session, Model, name=model)
    if found_model is None:
        raise InvalidInputError("model", f"{model!r} is not registered (GET /models)")
    found = find_dataset(session, name=dataset, owner_id=owner_id)
    if found is None:
        raise InvalidInputError("dataset", f"{dataset!r} is not registered (GET /datasets)")
    return found_model.id, found.id


def check_prompts(
    session: Session,
    *,
    dataset_id: uuid.UUID,
    task: dict[str, Any],
    num_prompts: int | None,
    prefix: str,
) -> None:
    """An uploaded dataset must hold out `task.eval_size` distinct prompts for evaluation and
    still have `sample.num_prompts` left to train on (None: the run draws none, it trains on a
    batch run's). Checked at submission, with the API's field names (`prefix` is where the
    request puts `task` and `sample`), so a run never queues only to fail on its data."""
    dataset = session.get(Dataset, dataset_id)
    if dataset is None or dataset.kind is RegistryKind.BUILTIN:
        return
    available = dataset.meta.get("prompts", dataset.meta.get("rows"))
    if not isinstance(available, int):  # registered by an operator: its size is not known
        return
    held = task.get("eval_size") or JSONL_EVAL_SIZE
    if available <= held:
        raise InvalidInputError(
            f"{prefix}task.eval_size",
            f"dataset {dataset.name!r} has {available} distinct prompts: holding out {held} for "
            f"evaluation leaves none to train on; set it to at most {available - 1}",
        )
    if num_prompts is not None and available - held < num_prompts:
        raise InvalidInputError(
            f"{prefix}sample.num_prompts",
            f"dataset {dataset.name!r} has {available} distinct prompts and {prefix}task."
            f"eval_size={held} of them are held out for evaluation: {available - held} are left "
            f"to train on, fewer than {num_prompts}; lower it (or {prefix}task.eval_size)",
        )


def check_owned_inputs(
    session: Session,
    *,
    owner_id: uuid.UUID,
    teachers: Sequence[uuid.UUID],
    batch_run: uuid.UUID | None,
    base_run: uuid.UUID | None,
) -> None:
    """Teacher, batch and base runs must be the key's own. Checked before create_run's own
    checks, whose messages (a run's kind, its status) would describe another key's runs."""
    named = [(f"teachers.{i}", t) for i, t in enumerate(teachers)]
    runs = (("batch_run", batch_run), ("base_run", base_run))
    named += [(field, run) for field, run in runs if run is not None]
    for field, run_id in named:
        try:
            get_run(session, run_id=run_id, owner_id=owner_id)
        except NotFoundError as exc:
            raise InvalidInputError(field, f"run {run_id} not found") from exc


def submit_run(
    session: Session,
    *,
    owner_id: uuid.UUID,
    limit: int,
    kind: RunKind,
    model: str,
    dataset: str,
    config: dict[str, Any],
    name: str | None = None,
    teachers: Sequence[uuid.UUID] = (),
    batch_run: uuid.UUID | None = None,
    base_run: uuid.UUID | None = None,
    gpu: int | None = None,
    notify_url: str | None = None,
    tags: Iterable[str] = (),
    max_attempts: int = 3,
    actor: str,
) -> Run:
    """One run for the key: the quota first, then the names, then the inputs' ownership, then
    create_run's checks (in that order, so a refusal never depends on another key's data)."""
    check_quota(session, owner_id=owner_id, adding=1, limit=limit)
    model_id, dataset_id = resolve(session, owner_id=owner_id, model=model, dataset=dataset)
    check_owned_inputs(
        session, owner_id=owner_id, teachers=teachers, batch_run=batch_run, base_run=base_run
    )
    draws = batch_run is None  # else it trains on the batch run's prompts
    check_prompts(
        session,
        dataset_id=dataset_id,
        task=config.get("task", {}),
        num_prompts=config.get("sample", {}).get("num_prompts") if draws else None,
        prefix="config.",
    )
    try:
        return create_run(
            session,
            kind=kind,
            model_id=model_id,
            dataset_id=dataset_id,
            config=config,
            name=name,
            owner_id=owner_id,
            teacher_ids=teachers,
            batch_run_id=batch_run,
            base_run_id=base_run,
            gpu=gpu,
            notify_url=notify_url,
            tags=tags,
            max_attempts=max_attempts,
            actor=actor,
        )
    except InvalidInputError as exc:
        head, dot, rest = exc.field.partition(".")
        field = _API_FIELDS.get(head, head) + dot + rest
        raise InvalidInputError(field, str(exc).removeprefix(f"{exc.field}: ")) from exc


def submit_pipeline(
    session: Session, *, owner_id: uuid.UUID, limit: int, spec: dict[str, Any], actor: str
) -> tuple[Pipeline, list[Run]]:
    """A whole pipeline for the key (`spec` as create_pipeline takes it); the quota counts every
    run of every round at once."""
    adding = runs_per_pipeline(spec["rounds"], len(spec["teachers"]), len(spec.get("controls", [])))
    check_quota(session, owner_id=owner_id, adding=adding, limit=limit)
    model_id, dataset_id = resolve(
        session, owner_id=owner_id, model=spec["model"], dataset=spec["dataset"]
    )
    check_prompts(
        session,
        dataset_id=dataset_id,
        task=spec["task"],
        num_prompts=spec["sample"]["num_prompts"],
        prefix="",
    )
    return create_pipeline(
        session,
        spec=spec,
        model_id=model_id,
        dataset_id=dataset_id,
        owner_id=owner_id,
        actor=actor,
    )


def cancel(session: Session, *, run_id: uuid.UUID, owner_id: uuid.UUID, actor: str) -> Run:
    get_run(session, run_id=run_id, owner_id=owner_id)
    return request_cancel(session, run_id=run_id, actor=actor)


def retry(
    session: Session, *, run_id: uuid.UUID, owner_id: uuid.UUID, limit: int, actor: str
) -> Run:
    """A new attempt counts against the quota like a new run; another key's run is not found
    before the quota is looked at. A run whose dataset its owner deleted cannot run again."""
    run = get_run(session, run_id=run_id, owner_id=owner_id)
    dataset = session.get(Dataset, run.dataset_id)
    if dataset is not None and dataset.deleted_at is not None:
        raise IllegalTransitionError(run.id, run.status, "retry: its dataset was deleted")
    check_quota(session, owner_id=owner_id, adding=1, limit=limit)
    return retry_run(session, run_id=run_id, actor=actor)


def rename(
    session: Session,
    *,
    run_id: uuid.UUID,
    owner_id: uuid.UUID,
    name: str | None = None,
    tags: Iterable[str] | None = None,
) -> Run:
    run = get_run(session, run_id=run_id, owner_id=owner_id)
    return set_name_and_tags(session, run=run, name=name, tags=tags)
