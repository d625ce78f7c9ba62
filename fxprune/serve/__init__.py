"""`fxprune serve`: an HTTP server (FastAPI + uvicorn) for a verified artifact."""

from fxprune.serve.server import ServeConfig, require_serve_extra, serve

__all__ = ["ServeConfig", "require_serve_extra", "serve"]
