"""The error a user can act on, as the app shows it."""

from __future__ import annotations

import gradio as gr


class UserError(gr.Error):
    """A message for the user (a bad image, a value out of range, out of memory): shown to them, and not logged as a
    traceback — it is no fault of the app. It pickles as itself (it crosses a ZeroGPU worker's fork)."""

    def __init__(self, message: str = "Error raised.", title: str = "Error") -> None:
        super().__init__(message, title=title, print_exception=False)

    def __reduce__(self):
        return (UserError, (self.message, self.title))
