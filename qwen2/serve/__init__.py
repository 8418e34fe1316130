"""`qwen2 serve`: an OpenAI-compatible server with continuous batching (needs the `serve` extra:
fastapi, uvicorn). `create_app` in app.py, the scheduler in engine.py."""


def create_app(*args, **kwargs):
    """See qwen2.serve.app.create_app (imported here lazily: FastAPI loads only when serving)."""
    from .app import create_app as _create_app

    return _create_app(*args, **kwargs)
