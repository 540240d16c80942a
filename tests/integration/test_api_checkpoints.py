"""Checkpoint downloads: a real saved model, resumable ranges, and path traversal probes."""

from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
import uuid
from pathlib import Path

import pytest
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from erpd.checkpoint import save_model_checkpoint
from server.db import CheckpointRole, make_engine, session_factory
from server.services import claim_run, register_checkpoint
from tests.conftest import random_model_dir
from tests.integration.conftest import Api


@pytest.fixture
def teacher(api: Api, tmp_path: Path) -> dict[str, str]:
    """A stage-1 run with a real teacher checkpoint saved in the server's artifact store."""
    run = api.post("/runs", json={"kind": "stage1"}).json()
    run_id = uuid.UUID(run["id"])
    source = random_model_dir(tmp_path / "src", LlamaConfig, LlamaForCausalLM)
    model = AutoModelForCausalLM.from_pretrained(source)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(source)
    key = f"runs/{run_id.hex}/teacher-8"
    sha = save_model_checkpoint(api.settings.artifacts / key, model, tokenizer, {"stage": 1})
    manifest = json.loads((api.settings.artifacts / key / "manifest.json").read_text())
    size = sum(f.stat().st_size for f in (api.settings.artifacts / key).iterdir())
    engine = make_engine(api.settings.db_url)
    with session_factory(engine).begin() as s:
        claim_run(s, run_id=run_id, worker="w", device="cpu")
        ckpt = register_checkpoint(
            s,
            run_id=run_id,
            attempt=1,
            role=CheckpointRole.TEACHER,
            step=8,
            key=key,
            size=size,
            sha256=sha,
            manifest=manifest,
        )
    engine.dispose()
    return {
        "run": run["id"],
        "id": str(ckpt.id),
        "sha": sha,
        "dir": str(api.settings.artifacts / key),
    }


def test_list_read_and_download_a_checkpoint_that_loads(api: Api, teacher, tmp_path) -> None:  # type: ignore[no-untyped-def]
    [listed] = api.get(f"/runs/{teacher['run']}/checkpoints").json()
    assert listed["id"] == teacher["id"] and listed["sha256"] == teacher["sha"]
    assert "model.safetensors" in listed["files"] and "manifest.json" in listed["files"]
    detail = api.get(f"/checkpoints/{teacher['id']}").json()
    assert detail["manifest"]["sha256"] == teacher["sha"]
    full = api.get(f"/checkpoints/{teacher['id']}/download")
    assert full.status_code == 200 and full.headers["etag"] == f'"{teacher["sha"]}"'
    assert full.headers["accept-ranges"] == "bytes"
    assert int(full.headers["content-length"]) == len(full.content)
    out = tmp_path / "out"
    with tarfile.open(fileobj=io.BytesIO(full.content)) as tar:
        tar.extractall(out, filter="data")
    [folder] = list(out.iterdir())
    model = AutoModelForCausalLM.from_pretrained(folder)
    assert sum(p.numel() for p in model.parameters()) > 0
    for name, digest in detail["manifest"]["files"].items():
        assert hashlib.sha256((folder / name).read_bytes()).hexdigest() == digest
    assert api.get(f"/checkpoints/{teacher['id']}", key=api.bob).status_code == 404
    assert api.get(f"/checkpoints/{teacher['id']}/download", key=api.bob).status_code == 404


def test_an_interrupted_download_resumes_with_ranges(api: Api, teacher) -> None:  # type: ignore[no-untyped-def]
    url = f"/checkpoints/{teacher['id']}/download"
    total = int(api.get(url).headers["content-length"])
    parts, start = [], 0
    for end in (total // 3, 2 * total // 3, total - 1):
        headers = {"Range": f"bytes={start}-{end}", "If-Range": f'"{teacher["sha"]}"'}
        part = api.client.get(f"/api/v1{url}", headers=api.headers() | headers)
        assert part.status_code == 206, part.text
        assert part.headers["content-range"] == f"bytes {start}-{end}/{total}"
        parts.append(part.content)
        start = end + 1
    whole = b"".join(parts)
    assert len(whole) == total and whole == api.get(url).content
    with tarfile.open(fileobj=io.BytesIO(whole)) as tar:
        member = next(m for m in tar.getmembers() if m.name.endswith("model.safetensors"))
        data = tar.extractfile(member).read()  # type: ignore[union-attr]
    manifest = api.get(f"/checkpoints/{teacher['id']}").json()["manifest"]
    assert hashlib.sha256(data).hexdigest() == manifest["files"]["model.safetensors"]
    single = api.client.get(
        f"/api/v1/checkpoints/{teacher['id']}/files/model.safetensors",
        headers=api.headers() | {"Range": "bytes=-100"},
    )
    assert single.status_code == 206 and single.content == data[-100:]
    beyond = api.client.get(
        f"/api/v1{url}", headers=api.headers() | {"Range": f"bytes={total}-{total + 10}"}
    )
    assert beyond.status_code == 416


@pytest.mark.parametrize(
    "name",
    [
        "../manifest.json",
        "%2e%2e/%2e%2e/etc/passwd",
        "%252e%252e/etc/passwd",
        "..%5c..%5cetc%5cpasswd",
        "..\\..\\etc\\passwd",
        "/etc/passwd",
        "%2fetc%2fpasswd",
        "config.json/../../../../etc/passwd",
    ],
)
def test_path_traversal_probes_never_return_file_contents(api: Api, teacher, name) -> None:  # type: ignore[no-untyped-def]
    got = api.client.get(f"/api/v1/checkpoints/{teacher['id']}/files/{name}", headers=api.headers())
    assert got.status_code in (404, 422), (name, got.status_code)
    assert b"root:" not in got.content and got.headers["content-type"].startswith(
        "application/json"
    )


def test_a_symlink_in_the_checkpoint_is_never_followed(api: Api, teacher) -> None:  # type: ignore[no-untyped-def]
    directory = Path(teacher["dir"])
    os.replace(directory / "config.json", directory / "config.real")
    os.symlink("/etc/passwd", directory / "config.json")
    single = api.get(f"/checkpoints/{teacher['id']}/files/config.json")
    assert single.status_code == 409 and b"root:" not in single.content
    full = api.get(f"/checkpoints/{teacher['id']}/download")
    assert full.status_code == 409 and full.json()["error"]["code"] == "damaged_checkpoint"
