"""The model and dataset registries. A request names a registered row; the `location` behind
it is set here, by the server or an operator, never taken from a request."""

from __future__ import annotations

import re
import uuid
from typing import Any, TypeVar

from sqlalchemy import or_, select
from sqlalchemy.orm import Session

from server.db import FINISHED, Dataset, Model, RegistryKind, Run, utcnow
from server.services.errors import ConflictError, InvalidInputError, NotFoundError

NAME = re.compile(r"^[a-z0-9][a-z0-9._-]{0,99}$")

# What every server offers without setup: the tiny model built and pretrained locally, and the
# built-in arithmetic task generated from a seed (erpd/models.py, erpd/tasks/arithmetic.py).
BUILTIN_MODELS = {"tiny": {"description": "tiny Llama-style model, pretrained on the task"}}
BUILTIN_DATASETS = {"arithmetic": {"description": "synthetic integer arithmetic, seeded"}}

Entry = TypeVar("Entry", Model, Dataset)


def register(
    session: Session,
    table: type[Entry],
    *,
    name: str,
    kind: RegistryKind,
    location: str,
    meta: dict[str, Any] | None = None,
    owner_id: uuid.UUID | None = None,
) -> Entry:
    """A new model or dataset. A dataset may belong to one key (`owner_id`); its name must be
    free among that key's and the shared ones. A shared entry's name must be free everywhere."""
    if not NAME.match(name):
        raise InvalidInputError("name", "1-100 of a-z 0-9 . _ -, starting with a letter or digit")
    clash = select(table.id).where(table.name == name)
    if table is Dataset:
        clash = clash.where(Dataset.deleted_at.is_(None))
    if table is Dataset and owner_id is not None:
        clash = clash.where(or_(Dataset.owner_id.is_(None), Dataset.owner_id == owner_id))
    if session.scalars(clash.limit(1)).first() is not None:
        raise ConflictError("name", f"{name!r} is taken")
    entry = table(
        id=uuid.uuid4(),
        name=name,
        kind=kind,
        location=location,
        meta=meta or {},
        created_at=utcnow(),
    )
    if isinstance(entry, Dataset):
        entry.owner_id = owner_id
    session.add(entry)
    session.flush()
    return entry


def ensure_builtins(session: Session) -> None:
    """Register the built-in model and task once (idempotent)."""
    _ensure(session, Model, BUILTIN_MODELS)
    _ensure(session, Dataset, BUILTIN_DATASETS)


def _ensure(session: Session, table: type[Entry], builtins: dict[str, dict[str, Any]]) -> None:
    have = set(session.scalars(select(table.name)))
    for name, meta in builtins.items():
        if name not in have:
            register(session, table, name=name, kind=RegistryKind.BUILTIN, location=name, meta=meta)


def find(session: Session, table: type[Entry], *, name: str) -> Entry | None:
    return session.scalars(select(table).where(table.name == name)).first()


def find_dataset(session: Session, *, name: str, owner_id: uuid.UUID) -> Dataset | None:
    """The dataset this key means by `name`: its own upload or a shared one."""
    return session.scalars(
        select(Dataset).where(
            Dataset.name == name,
            or_(Dataset.owner_id.is_(None), Dataset.owner_id == owner_id),
            Dataset.deleted_at.is_(None),
        )
    ).first()


def find_by_id(session: Session, table: type[Entry], *, entry_id: uuid.UUID) -> Entry | None:
    return session.get(table, entry_id)


def list_models(session: Session) -> list[Model]:
    """Every registered model (models are shared by all keys), by name."""
    return list(session.scalars(select(Model).order_by(Model.name)))


def list_datasets(session: Session, *, owner_id: uuid.UUID) -> list[Dataset]:
    """The datasets this key may name: the shared ones and its own uploads, by name."""
    return list(
        session.scalars(
            select(Dataset)
            .where(
                or_(Dataset.owner_id.is_(None), Dataset.owner_id == owner_id),
                Dataset.deleted_at.is_(None),
            )
            .order_by(Dataset.name)
        )
    )


def delete_dataset(session: Session, *, dataset_id: uuid.UUID, owner_id: uuid.UUID) -> str:
    """Delete the key's uploaded dataset; returns its stored file's name, for the caller to
    remove once this commits. Refused (409) while a queued or running run uses it. A dataset
    that finished runs name keeps its row (their lineage), marked deleted under a freed name;
    one that no run names is deleted outright. Another key's dataset is not found."""
    dataset = session.scalars(
        select(Dataset)
        .where(Dataset.id == dataset_id, Dataset.deleted_at.is_(None))
        .with_for_update()
    ).one_or_none()
    if dataset is None or (dataset.owner_id != owner_id and dataset.owner_id is not None):
        raise NotFoundError("dataset", dataset_id)
    if dataset.kind is not RegistryKind.UPLOADED or dataset.owner_id is None:
        raise ConflictError("dataset", f"{dataset.name!r} is shared: only uploads can be deleted")
    # FOR SHARE: a run created on it concurrently is seen, or waits until this commits
    users = session.execute(
        select(Run.id, Run.status)
        .where(Run.dataset_id == dataset_id)
        .order_by(Run.created_at)
        .with_for_update(read=True)
    ).all()
    active = [str(run_id) for run_id, status in users if status not in FINISHED]
    if active:
        shown = ", ".join(active[:10]) + (" ..." if len(active) > 10 else "")
        raise ConflictError(
            "dataset", f"{len(active)} queued or running runs use it ({shown}): cancel them first"
        )
    location = dataset.location
    if users:
        dataset.deleted_at = utcnow()
        dataset.meta = {**dataset.meta, "deleted_name": dataset.name}
        dataset.name = f"~{dataset.id.hex}"  # the owner may upload under its name again
    else:
        session.delete(dataset)
    session.flush()
    return location
