"""Checkpoints: list a run's, read a manifest, download (resumable: ETag, Range, 206; a range
past the end is 416 with `Content-Range: bytes */<size>`, a malformed one is ignored)."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

from fastapi import APIRouter, Request
from fastapi.responses import Response, StreamingResponse

from server import artifacts
from server.api.deps import KeyDep, ReadSession, StateDep
from server.api.errors import ApiError, error_response
from server.db import Checkpoint
from server.schemas import CheckpointDetail, CheckpointOut
from server.services import get_checkpoint
from server.services import list_checkpoints as checkpoints_of

router = APIRouter(tags=["checkpoints"])


def _out(ckpt: Checkpoint) -> dict[str, object]:
    return {
        "id": ckpt.id,
        "run": ckpt.run_id,
        "role": ckpt.role.value,
        "step": ckpt.step,
        "bytes": ckpt.bytes,
        "sha256": ckpt.sha256,
        "created_at": ckpt.created_at,
        "files": artifacts.listed_files(ckpt),
    }


@router.get("/runs/{run_id}/checkpoints", response_model=list[CheckpointOut])
def list_checkpoints(run_id: uuid.UUID, session: ReadSession, key: KeyDep) -> list[CheckpointOut]:
    rows = checkpoints_of(session, run_id=run_id, owner_id=key.id)
    return [CheckpointOut.model_validate(_out(c)) for c in rows]


@router.get("/checkpoints/{checkpoint_id}", response_model=CheckpointDetail)
def read_checkpoint(
    checkpoint_id: uuid.UUID, session: ReadSession, key: KeyDep
) -> CheckpointDetail:
    ckpt = get_checkpoint(session, checkpoint_id=checkpoint_id, owner_id=key.id)
    return CheckpointDetail.model_validate(_out(ckpt) | {"manifest": ckpt.manifest})


def _ranged(
    request: Request, pieces: list[artifacts.Piece], etag: str, filename: str, media_type: str
) -> Response:
    total = sum(p.length for p in pieces)
    headers = {
        "ETag": f'"{etag}"',
        "Accept-Ranges": "bytes",
        "Content-Disposition": f'attachment; filename="{filename}"',
    }
    wanted = request.headers.get("range")
    if_range = request.headers.get("if-range")
    if if_range is not None and if_range.strip('"') != etag:
        wanted = None  # the file changed since the client's partial copy: send it whole
    try:
        window = artifacts.parse_range(wanted, total)
    except artifacts.UnsatisfiableRangeError:
        refused = error_response(416, "range_not_satisfiable", f"this body has {total} bytes")
        refused.headers["Content-Range"] = f"bytes */{total}"  # the size to ask within
        refused.headers["Accept-Ranges"] = "bytes"
        return refused
    start, end = window or (0, total - 1)
    headers["Content-Length"] = str(end - start + 1)
    status = 200
    if window is not None:
        headers["Content-Range"] = f"bytes {start}-{end}/{total}"
        status = 206

    def body() -> Iterator[bytes]:
        yield from artifacts.read_range(pieces, start, end)

    return StreamingResponse(body(), status_code=status, headers=headers, media_type=media_type)


def _damaged(exc: artifacts.DamagedCheckpointError) -> Response:
    return error_response(409, "damaged_checkpoint", f"checkpoint files do not match: {exc}")


@router.get(
    "/checkpoints/{checkpoint_id}/download",
    summary="The checkpoint as a tar stream (HF directory); resumable with Range",
    response_class=StreamingResponse,
)
def download(
    checkpoint_id: uuid.UUID, request: Request, state: StateDep, session: ReadSession, key: KeyDep
) -> Response:
    ckpt = get_checkpoint(session, checkpoint_id=checkpoint_id, owner_id=key.id)
    try:
        directory = artifacts.checkpoint_dir(state.settings.artifacts, ckpt)
        pieces = artifacts.tar_pieces(directory, ckpt)
    except artifacts.DamagedCheckpointError as exc:
        return _damaged(exc)
    name = f"{ckpt.role.value}-{ckpt.step}-{ckpt.sha256[:12]}.tar"
    return _ranged(request, pieces, ckpt.sha256, name, "application/x-tar")


@router.get(
    "/checkpoints/{checkpoint_id}/files/{name:path}",
    summary="One file of the checkpoint (names from its manifest)",
    response_class=StreamingResponse,
)
def download_file(
    checkpoint_id: uuid.UUID,
    name: str,
    request: Request,
    state: StateDep,
    session: ReadSession,
    key: KeyDep,
) -> Response:
    ckpt = get_checkpoint(session, checkpoint_id=checkpoint_id, owner_id=key.id)
    files = ckpt.manifest.get("files", {})
    if name not in artifacts.listed_files(ckpt):  # a dictionary lookup, never a path join first
        raise ApiError(404, "not_found", f"checkpoint {checkpoint_id} has no file {name!r}")
    try:
        directory = artifacts.checkpoint_dir(state.settings.artifacts, ckpt)
        pieces = artifacts.file_pieces(directory, name)
    except artifacts.DamagedCheckpointError as exc:
        return _damaged(exc)
    etag = files.get(name) or ckpt.sha256
    return _ranged(request, pieces, str(etag), name.rsplit("/", 1)[-1], "application/octet-stream")
