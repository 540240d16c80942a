"""The OpenAPI document and Swagger UI. Like every reading endpoint they need an API key, unless
the operator makes them public (ERPD_PUBLIC_DOCS=true: handy on a laptop, the UI cannot send a
key when it fetches the document)."""

from __future__ import annotations

from typing import Any

from fastapi import Depends, FastAPI
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse, JSONResponse

from server.api.deps import current_key


def install(app: FastAPI, *, prefix: str, public: bool) -> None:
    guard: list[Any] = [] if public else [Depends(current_key)]

    @app.get(f"{prefix}/openapi.json", include_in_schema=False, dependencies=guard)
    def openapi() -> JSONResponse:
        return JSONResponse(app.openapi())

    if public:

        @app.get(f"{prefix}/docs", include_in_schema=False)
        def swagger() -> HTMLResponse:
            return get_swagger_ui_html(openapi_url=f"{prefix}/openapi.json", title=app.title)
