"""Request bodies as strict JSON: a number field takes a JSON number, a boolean field a JSON
boolean, a string field a JSON string. FastAPI validates bodies in pydantic's lax mode, which
turns `"3"` into 3 and `true` into 1; a client that sent those has a bug the API should name,
not hide. Strict validation of the raw bytes also reaches the training core's models embedded in
run configs (erpd.config), whose own config the API does not set.

A route adds `dependencies=[strict_json(Model)]`: the check runs before FastAPI's own validation
(which then always passes) and raises the same RequestValidationError, so the error is the API's
usual 422 naming the field.
"""

from __future__ import annotations

from typing import Any

from fastapi import Depends, Request
from fastapi.exceptions import RequestValidationError
from pydantic import TypeAdapter, ValidationError


def strict_json(model: Any) -> Any:
    """A route dependency that refuses a body that is not `model` in strict JSON."""
    adapter: TypeAdapter[Any] = TypeAdapter(model)

    async def check(request: Request) -> None:
        raw = await request.body()  # starlette keeps it: FastAPI's own parse reads it again
        if not raw.strip():
            return  # FastAPI's validation names the missing body
        try:
            adapter.validate_json(raw, strict=True)
        except ValidationError as exc:
            errors = [
                {**error, "loc": ("body", *error["loc"])}
                for error in exc.errors(include_url=False, include_context=True)
            ]
            raise RequestValidationError(errors) from None

    return Depends(check)
