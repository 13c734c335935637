"""The multi-user memory server: `create_app(model, tokenizer, data_dir=..., api_keys=...)` (see app.py)."""

from .app import create_app

__all__ = ["create_app"]
