"""OpenAI-compatible HTTP serving: ``create_app(engine, model_name)`` and the ``hf-turbo serve`` command.

Needs the ``serve`` extra (fastapi, uvicorn); importing this package does not import them.
"""

from __future__ import annotations

__all__ = ["create_app"]


def create_app(*args, **kwargs):
    """See :func:`hf_turbo.serve.app.create_app` (imported lazily: fastapi is an optional dependency)."""
    from hf_turbo.serve.app import create_app as _create_app

    return _create_app(*args, **kwargs)
