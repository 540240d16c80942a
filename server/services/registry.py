"""The model and dataset registries. A request names a registered row; the `location` behind
it is set here, by the server or an operator, never taken from a request."""

from __future__ import annotations

import re
import uuid
from typing import Any, TypeVar

from sqlalchemy import or_, select
from sqlalchemy.orm import Session

from server.db import Dataset, Model, RegistryKind, utcnow
from server.services.errors import ConflictError, InvalidInputError

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
            Dataset.name == name, or_(Dataset.owner_id.is_(None), Dataset.owner_id == owner_id)
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
            .where(or_(Dataset.owner_id.is_(None), Dataset.owner_id == owner_id))
            .order_by(Dataset.name)
        )
    )
