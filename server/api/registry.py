"""The models and datasets a run may name."""

from __future__ import annotations

from fastapi import APIRouter
from sqlalchemy import or_, select

from server.api.deps import KeyDep, ReadSession
from server.db import Dataset, Model
from server.schemas import RegistryOut

router = APIRouter(tags=["registry"])


@router.get("/models", response_model=list[RegistryOut], summary="Registered models")
def models(session: ReadSession, key: KeyDep) -> list[RegistryOut]:
    rows = session.scalars(select(Model).order_by(Model.name))
    return [
        RegistryOut(id=m.id, name=m.name, kind=m.kind, metadata=m.meta, created_at=m.created_at)
        for m in rows
    ]


@router.get("/datasets", response_model=list[RegistryOut], summary="Your and shared datasets")
def datasets(session: ReadSession, key: KeyDep) -> list[RegistryOut]:
    rows = session.scalars(
        select(Dataset)
        .where(or_(Dataset.owner_id.is_(None), Dataset.owner_id == key.id))
        .order_by(Dataset.name)
    )
    return [
        RegistryOut(id=d.id, name=d.name, kind=d.kind, metadata=d.meta, created_at=d.created_at)
        for d in rows
    ]
