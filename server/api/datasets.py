"""Datasets: upload a JSONL of {"prompt", "answer"} rows, validated row by row with the training
core's own parser and stored under a generated name (the client's filename is ignored); delete
one that no queued or running run uses.

Copying, hashing and parsing an upload take seconds for a large file: they run in a worker
thread, so the event loop (and every other request, /healthz included) never waits on them.
"""

from __future__ import annotations

import hashlib
import os
import uuid
from pathlib import Path
from typing import IO, Annotated, Any

import anyio
from fastapi import APIRouter, File, Form, Response, UploadFile
from sqlalchemy.exc import IntegrityError

from erpd.errors import DataError
from erpd.tasks.jsonl import iter_problems
from server.api.deps import AppState, KeyDep, StateDep
from server.api.errors import ApiError
from server.api.registry import registry_out
from server.db import Dataset, RegistryKind
from server.schemas import RegistryOut
from server.services import register
from server.services.registry import delete_dataset

router = APIRouter(tags=["registry"])
CHUNK = 1 << 20
MIN_PROMPTS = 2  # one held out for evaluation, one to train on


def _copy_and_check(source: IO[bytes], tmp: Path, limit: int) -> dict[str, Any]:
    """Copy the upload to `tmp` in chunks (at most `limit` bytes), hash it and parse every row.
    Blocking: called in a worker thread."""
    digest, size = hashlib.sha256(), 0
    with tmp.open("wb") as out:
        while chunk := source.read(CHUNK):
            size += len(chunk)
            if size > limit:
                raise ApiError(413, "too_large", f"file: over {limit} bytes", "file")
            digest.update(chunk)
            out.write(chunk)
    # rows are counted as they are parsed, never kept: 60k parsed rows held at once made the
    # garbage collector pause the whole API process (every request, /healthz too) for ~1 s
    rows, distinct = 0, set()
    try:
        for problem in iter_problems(tmp):
            rows += 1
            distinct.add(problem.prompt)
    except DataError as exc:
        raise ApiError(422, "invalid", str(exc).replace(str(tmp), "file"), "file") from exc
    prompts = len(distinct)  # what a run can split: distinct prompts
    if prompts < MIN_PROMPTS:
        raise ApiError(
            422,
            "invalid",
            f"file: {prompts} distinct prompt; a run holds some out for evaluation and trains "
            f"on the rest, so it needs at least {MIN_PROMPTS}",
            "file",
        )
    return {
        "rows": rows,
        "prompts": prompts,
        "bytes": size,
        "sha256": digest.hexdigest(),
        "format": "jsonl",
    }


@router.post("/datasets", status_code=201, response_model=RegistryOut, summary="Upload a dataset")
async def upload_dataset(
    state: StateDep,
    key: KeyDep,
    name: Annotated[str, Form(pattern=r"^[a-z0-9][a-z0-9._-]{0,99}$", description="Its name.")],
    file: Annotated[UploadFile, File(description='JSONL: {"prompt": str, "answer": str|num}')],
) -> RegistryOut:
    store = state.settings.home / "datasets"
    store.mkdir(parents=True, exist_ok=True)
    stored = f"{uuid.uuid4().hex}.jsonl"
    tmp = store / f".{stored}.part"
    limit = state.settings.max_upload_bytes
    try:
        meta = await anyio.to_thread.run_sync(_copy_and_check, file.file, tmp, limit)
        final = store / stored
        os.replace(tmp, final)  # in place before the row exists: a registered dataset has a file
        return await anyio.to_thread.run_sync(_register, state, key.id, name, stored, meta)
    finally:
        tmp.unlink(missing_ok=True)


def _register(
    state: AppState, owner_id: uuid.UUID, name: str, stored: str, meta: dict[str, Any]
) -> RegistryOut:
    final = state.settings.home / "datasets" / stored
    try:
        with state.writes.begin() as session:
            entry = register(
                session,
                Dataset,
                name=name,
                kind=RegistryKind.UPLOADED,
                location=stored,
                meta=meta,
                owner_id=owner_id,
            )
            return registry_out(entry)
    except BaseException as exc:
        final.unlink(missing_ok=True)
        if isinstance(exc, IntegrityError):  # a concurrent upload took the name first
            raise ApiError(409, "conflict", f"name: {name!r} is taken", "name") from exc
        raise


@router.delete(
    "/datasets/{dataset_id}",
    status_code=204,
    summary="Delete an uploaded dataset (409 while a queued or running run uses it)",
)
def remove_dataset(dataset_id: uuid.UUID, state: StateDep, key: KeyDep) -> Response:
    with state.writes.begin() as session:
        location = delete_dataset(session, dataset_id=dataset_id, owner_id=key.id)
    # after the commit: a dataset that is gone from the store never names a missing file
    (state.settings.home / "datasets" / location).unlink(missing_ok=True)
    return Response(status_code=204)
