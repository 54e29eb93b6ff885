"""The OpenAPI description of the server (``GET /openapi.json``), request models included.

The generation routes read their bodies by hand (so that every bad body gets OpenAI's error shape),
so FastAPI cannot see their models; this adds them, with the value bounds of
:mod:`hf_turbo.serve.rules`, so that clients and fuzzers (schemathesis) know what each route takes.
"""

from __future__ import annotations

from fastapi import FastAPI

from hf_turbo.serve.protocol import ChatCompletionRequest, CompletionRequest

__all__ = ["install_openapi", "request_schemas"]

_REF = "#/components/schemas/{model}"


def request_schemas(model_name: str | None = None) -> dict[str, dict]:
    """JSON schemas of the request models and the models they use, keyed by name; with ``model_name``,
    ``model`` is that one name (the only one the server serves)."""
    out: dict[str, dict] = {}
    for model in (CompletionRequest, ChatCompletionRequest):
        schema = model.model_json_schema(ref_template=_REF)
        out.update(schema.pop("$defs", {}))
        if model_name is not None:
            schema["properties"]["model"]["enum"] = [model_name]
        out[model.__name__] = schema
    return out


def install_openapi(app: FastAPI, model_name: str) -> None:
    """Make ``app.openapi()`` (and so ``/openapi.json``) include the request models."""
    base = app.openapi

    def openapi() -> dict:
        if app.openapi_schema is None:
            schema = base()
            schema.setdefault("components", {}).setdefault("schemas", {}).update(request_schemas(model_name))
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi
