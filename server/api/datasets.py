"""`POST /datasets`: upload a JSONL of {"prompt", "answer"} rows, validated row by row with the
training core's own parser, stored under a generated name (the client's filename is ignored)."""

from __future__ import annotations

import hashlib
import os
import uuid
from typing import Annotated

from fastapi import APIRouter, File, Form, UploadFile
from sqlalchemy.exc import IntegrityError

from erpd.errors import DataError
from erpd.tasks.jsonl import load_problems
from server.api.deps import KeyDep, StateDep
from server.api.errors import ApiError
from server.api.registry import registry_out
from server.db import Dataset, RegistryKind
from server.schemas import RegistryOut
from server.services import register

router = APIRouter(tags=["registry"])
CHUNK = 1 << 20


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
    digest, size = hashlib.sha256(), 0
    try:
        with tmp.open("wb") as out:
            while chunk := await file.read(CHUNK):
                size += len(chunk)
                if size > state.settings.max_upload_bytes:
                    limit = state.settings.max_upload_bytes
                    raise ApiError(413, "too_large", f"file: over {limit} bytes", "file")
                digest.update(chunk)
                out.write(chunk)
        try:
            rows = len(load_problems(tmp))
        except DataError as exc:
            message = str(exc).replace(str(tmp), "file")
            raise ApiError(422, "invalid", message, "file") from exc
        meta = {"rows": rows, "bytes": size, "sha256": digest.hexdigest(), "format": "jsonl"}
        final = store / stored
        os.replace(tmp, final)  # in place before the row exists: a registered dataset has a file
        try:
            with state.writes.begin() as session:
                entry = register(
                    session,
                    Dataset,
                    name=name,
                    kind=RegistryKind.UPLOADED,
                    location=stored,
                    meta=meta,
                    owner_id=key.id,
                )
        except BaseException as exc:
            final.unlink(missing_ok=True)
            if isinstance(exc, IntegrityError):  # a concurrent upload took the name first
                raise ApiError(409, "conflict", f"name: {name!r} is taken", "name") from exc
            raise
    finally:
        tmp.unlink(missing_ok=True)
    return registry_out(entry)
