"""gr.Blocks with a cheap `gr.skip()`.

gradio 6 treats a skipped output (`gr.skip()`, i.e. `{"__type__": "update"}` with nothing in
it) like any other property update: it builds a new component for the session and its config,
pydantic JSON schema included. That is tens of milliseconds per poll for the page timers, whose
answers are mostly "nothing changed", and it runs in the same process as training. A skip
changes nothing on the page, so this sends it as is and lets gradio post-process only the
outputs that carry something."""
from __future__ import annotations

import copy

import gradio as gr


def is_bare_skip(value) -> bool:
    return isinstance(value, dict) and value == {"__type__": "update"}


class Blocks(gr.Blocks):
    async def postprocess_data(self, block_fn, predictions, state):
        outputs = list(block_fn.outputs)
        if not isinstance(predictions, (list, tuple)) or len(outputs) < 2 or \
                len(predictions) != len(outputs):
            return await super().postprocess_data(block_fn, predictions, state)
        skipped = {i for i, value in enumerate(predictions) if is_bare_skip(value)}
        if not skipped:
            return await super().postprocess_data(block_fn, predictions, state)
        # what gradio answers for a skip: None for a State (kept on the server), else the skip
        answer: list = [None if outputs[i].stateful else gr.skip() for i in range(len(outputs))]
        kept = [i for i in range(len(outputs)) if i not in skipped]
        if not kept:
            return answer
        narrowed = copy.copy(block_fn)  # the shared one stays untouched for concurrent calls
        narrowed.outputs = [outputs[i] for i in kept]
        values = [predictions[i] for i in kept]
        if len(kept) == 1 and not block_fn.batch:
            values = values[0]  # gradio wraps the value of a single output itself
        done = await super().postprocess_data(narrowed, values, state)
        for i, value in zip(kept, done):
            answer[i] = value
        return answer
