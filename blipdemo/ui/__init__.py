"""The Gradio app: ``layout`` (the page, and which handler each event runs), ``chat`` (where a request becomes a
``Question`` and its answer streams back), ``maps`` (the maps panel)."""

from .layout import CSS, Demo

__all__ = ["CSS", "Demo"]
