"""erpd-hub's Python client: a small typed client over the REST API, used by the dashboard (its
only way to the data), the `erpd-hub` CLI verbs (submit, runs, logs, download) and users' scripts.

    from erpd_hub.client import ApiClient
    api = ApiClient("http://127.0.0.1:8000/api/v1", key)
    pipeline = api.submit_pipeline({"teachers": [{"objective": "sapo"}]})

Every call raises ApiError with the API's own error body (code, message, field), so a caller can
show a 422 next to the field it names instead of a traceback. Nothing here imports torch.
"""

from __future__ import annotations

import json
import shutil
import tarfile
import uuid
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, NoReturn

import httpx

from erpd.digest import MANIFEST, hash_files, tree_sha256


class ApiError(Exception):
    def __init__(self, status: int, code: str, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.field = status, code, message, field


def server_sent_events(lines: Iterable[str]) -> Iterator[tuple[str, dict[str, Any]]]:
    """(event, JSON data) for each event in a text/event-stream's lines; pings are skipped."""
    event, data = "message", []
    for line in lines:
        if line.startswith("event:"):
            event = line.split(":", 1)[1].strip()
        elif line.startswith("data:"):
            data.append(line.split(":", 1)[1].strip())
        elif line == "" and data:
            yield event, json.loads("\n".join(data))
            event, data = "message", []


class ApiClient:
    def __init__(self, base_url: str, key: str, *, timeout_s: float = 30.0) -> None:
        self.base_url = base_url.rstrip("/")
        self.http = httpx.Client(
            base_url=self.base_url,
            headers={"Authorization": f"Bearer {key}", "User-Agent": "erpd-hub-dashboard"},
            timeout=timeout_s,
        )

    def close(self) -> None:
        self.http.close()

    # --- plumbing -----------------------------------------------------------------------------
    def _send(self, method: str, path: str, **kwargs: Any) -> Any:
        try:
            response = self.http.request(method, path, **kwargs)
        except httpx.HTTPError as exc:
            raise ApiError(0, "unreachable", f"API unreachable at {self.base_url}: {exc}") from exc
        if response.is_success:
            try:
                return response.json()
            except ValueError as exc:
                raise ApiError(response.status_code, "bad_response", "not a JSON answer") from exc
        self._raise(response)

    @staticmethod
    def _raise(response: httpx.Response) -> NoReturn:
        try:
            body = response.json()["error"]
            raise ApiError(response.status_code, body["code"], body["message"], body.get("field"))
        except (ValueError, KeyError, TypeError):
            raise ApiError(response.status_code, "http", response.text[:200]) from None

    def get(self, path: str, **params: Any) -> Any:
        clean = {k: v for k, v in params.items() if v is not None and v != []}
        return self._send("GET", path, params=clean)

    # --- reads --------------------------------------------------------------------------------
    def runs(
        self,
        *,
        status: Sequence[str] = (),
        kind: Sequence[str] = (),
        tag: str | None = None,
        pipeline: str | None = None,
        limit: int = 200,
        cursor: str | None = None,
    ) -> dict[str, Any]:
        return self.get(
            "/runs",
            status=list(status),
            kind=list(kind),
            tag=tag or None,
            pipeline=pipeline or None,
            limit=limit,
            cursor=cursor,
        )

    def all_runs(self, *, limit: int = 500, **filters: Any) -> Iterator[dict[str, Any]]:
        """Every run matching the filters, newest first, up to `limit`."""
        cursor, seen = None, 0
        while seen < limit:
            page = self.runs(limit=min(500, limit - seen), cursor=cursor, **filters)
            yield from page["items"]
            seen += len(page["items"])
            cursor = page["next"]
            if cursor is None:
                return

    def run(self, run_id: str | uuid.UUID) -> dict[str, Any]:
        return self.get(f"/runs/{run_id}")

    def events(self, run_id: str | uuid.UUID) -> list[dict[str, Any]]:
        return self.get(f"/runs/{run_id}/events")

    def metrics(
        self,
        run_id: str | uuid.UUID,
        *,
        names: Sequence[str] = (),
        since_step: int = -1,
        end_step: int | None = None,
        max_points: int = 2_000,
    ) -> dict[str, Any]:
        return self.get(
            f"/runs/{run_id}/metrics",
            names=",".join(names) or None,
            since_step=since_step,
            end_step=end_step,
            max_points=max_points,
        )

    def values_at(
        self, run_id: str | uuid.UUID, names: Sequence[str], step: int
    ) -> dict[str, float]:
        """Each of `names` as logged at `step` (a metric not logged there is left out): a
        teacher's values at step 0 measure its round's base before any update."""
        found = self.metrics(run_id, names=names, since_step=step - 1, end_step=step)
        return {
            s["name"]: s["values"][s["steps"].index(step)]
            for s in found["series"]
            if step in s["steps"]
        }

    def checkpoints(self, run_id: str | uuid.UUID) -> list[dict[str, Any]]:
        return self.get(f"/runs/{run_id}/checkpoints")

    def download(self, checkpoint_id: str) -> bytes:
        """A checkpoint's tar, read when the user clicks (never before)."""
        response = self.http.get(f"/checkpoints/{checkpoint_id}/download", timeout=600)
        if not response.is_success:
            raise ApiError(response.status_code, "download", response.text[:200])
        return response.content

    def catalogue(self) -> dict[str, dict[str, Any]]:
        return {m["name"]: m for m in self.get("/metrics/catalogue")}

    def compare(self, run_ids: Sequence[str]) -> dict[str, Any]:
        return self.get("/compare", runs=",".join(run_ids))

    def models(self) -> list[dict[str, Any]]:
        return self.get("/models")

    def datasets(self) -> list[dict[str, Any]]:
        return self.get("/datasets")

    def checkpoint(self, checkpoint_id: str) -> dict[str, Any]:
        return self.get(f"/checkpoints/{checkpoint_id}")

    def stream(self, run_id: str, *, since_step: int = -1) -> Iterator[tuple[str, dict[str, Any]]]:
        """The run's server-sent events, (event, data), until its `end` event."""
        timeout = httpx.Timeout(30, read=None)  # a quiet run sends pings, not data
        try:
            with self.http.stream(
                "GET", f"/runs/{run_id}/stream", params={"since_step": since_step}, timeout=timeout
            ) as response:
                if not response.is_success:
                    response.read()
                    self._raise(response)
                for event, data in server_sent_events(response.iter_lines()):
                    yield event, data
                    if event == "end":
                        return
        except httpx.HTTPError as exc:
            raise ApiError(0, "unreachable", f"stream interrupted: {exc}") from exc

    def download_checkpoint(self, checkpoint_id: str, out_dir: str | Path) -> Path:
        """Download a checkpoint into `out_dir/<its folder>`, resuming an interrupted download
        (`<folder>.tar.part`, Range + If-Range on its sha256), and verify every file against the
        manifest and the whole against the checkpoint's sha256 before keeping it."""
        info = self.checkpoint(checkpoint_id)
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        part = out / f"{checkpoint_id}.tar.part"
        have = part.stat().st_size if part.exists() else 0
        headers = {"Range": f"bytes={have}-", "If-Range": f'"{info["sha256"]}"'} if have else {}
        url = f"/checkpoints/{checkpoint_id}/download"
        with self.http.stream("GET", url, headers=headers, timeout=httpx.Timeout(30)) as response:
            if response.status_code not in (200, 206):
                response.read()
                self._raise(response)
            mode = "ab" if response.status_code == 206 else "wb"  # 200: the server started over
            with part.open(mode) as f:
                for chunk in response.iter_bytes(1 << 20):
                    f.write(chunk)
        staging = out / f".{checkpoint_id}.extract"
        shutil.rmtree(staging, ignore_errors=True)
        try:
            with tarfile.open(part) as archive:
                archive.extractall(staging, filter="data")
            [folder] = [p for p in staging.iterdir() if p.is_dir()]
            manifest = json.loads((folder / MANIFEST).read_text())
            files = hash_files(folder)
        except (tarfile.TarError, ValueError, OSError):  # a damaged partial download
            files, manifest, folder = {}, {}, staging
        if not files or files != manifest.get("files") or tree_sha256(files) != info["sha256"]:
            shutil.rmtree(staging, ignore_errors=True)
            part.unlink()
            raise ApiError(
                0, "corrupt", f"checkpoint {checkpoint_id}: sha256 does not match; download again"
            )
        target = out / folder.name
        shutil.rmtree(target, ignore_errors=True)
        folder.rename(target)
        shutil.rmtree(staging, ignore_errors=True)
        part.unlink()
        return target

    # --- actions ------------------------------------------------------------------------------
    def submit_pipeline(
        self, body: dict[str, Any], *, idempotency_key: str | None = None
    ) -> dict[str, Any]:
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else {}
        return self._send("POST", "/pipelines", json=body, headers=headers)

    def submit_run(
        self, body: dict[str, Any], *, idempotency_key: str | None = None
    ) -> dict[str, Any]:
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else {}
        return self._send("POST", "/runs", json=body, headers=headers)

    def cancel(self, run_id: str) -> dict[str, Any]:
        return self._send("POST", f"/runs/{run_id}/cancel")

    def retry(self, run_id: str) -> dict[str, Any]:
        return self._send("POST", f"/runs/{run_id}/retry")
