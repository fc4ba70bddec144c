"""The base of a tab's event handlers."""
from __future__ import annotations

import inspect


class Handlers:
    """A tab's event handlers, as methods (gradio names an event's API endpoint after its
    function). Each public method is bound once, here, so the events given one handler share
    one function object and so one concurrency group: gradio groups events by their function's
    id, and a method read twice from an instance is two objects."""

    def __init__(self) -> None:
        for name, _ in inspect.getmembers(type(self), inspect.isfunction):
            if not name.startswith("_"):
                setattr(self, name, getattr(self, name))
