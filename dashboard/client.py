"""The dashboard's only way to the data: a small typed client over the REST API.

Every call raises ApiError with the API's own error body (code, message, field), so a page can
show a 422 next to the field it names instead of a traceback.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator, Sequence
from typing import Any

import httpx


class ApiError(Exception):
    def __init__(self, status: int, code: str, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.field = status, code, message, field


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
        max_points: int = 2_000,
    ) -> dict[str, Any]:
        return self.get(
            f"/runs/{run_id}/metrics",
            names=",".join(names) or None,
            since_step=since_step,
            max_points=max_points,
        )

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

    # --- actions ------------------------------------------------------------------------------
    def submit_pipeline(self, body: dict[str, Any]) -> dict[str, Any]:
        return self._send("POST", "/pipelines", json=body)

    def cancel(self, run_id: str) -> dict[str, Any]:
        return self._send("POST", f"/runs/{run_id}/cancel")

    def retry(self, run_id: str) -> dict[str, Any]:
        return self._send("POST", f"/runs/{run_id}/retry")
