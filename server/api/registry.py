"""The models and datasets a run may name."""

from __future__ import annotations

from fastapi import APIRouter

from server.api.deps import KeyDep, ReadSession
from server.db import Dataset, Model
from server.schemas import RegistryOut
from server.services.registry import list_datasets, list_models

router = APIRouter(tags=["registry"])


def registry_out(entry: Model | Dataset) -> RegistryOut:
    """A registered model or dataset as the API shows it (uploads answer with it too)."""
    return RegistryOut(
        id=entry.id,
        name=entry.name,
        kind=entry.kind,
        metadata=entry.meta,
        created_at=entry.created_at,
    )


@router.get("/models", response_model=list[RegistryOut], summary="Registered models")
def models(session: ReadSession, key: KeyDep) -> list[RegistryOut]:
    return [registry_out(m) for m in list_models(session)]


@router.get("/datasets", response_model=list[RegistryOut], summary="Your and shared datasets")
def datasets(session: ReadSession, key: KeyDep) -> list[RegistryOut]:
    return [registry_out(d) for d in list_datasets(session, owner_id=key.id)]
