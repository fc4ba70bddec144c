"""gr.Blocks with a cheap `gr.skip()`, and choice errors that name their field.

gradio 6 treats a skipped output (`gr.skip()`, i.e. `{"__type__": "update"}` with nothing in
it) like any other property update: it builds a new component for the session and its config,
pydantic JSON schema included. That is tens of milliseconds per poll for the page timers, whose
answers are mostly "nothing changed", and it runs in the same process as training. A skip
changes nothing on the page, so this sends it as is and lets gradio post-process only the
outputs that carry something.

A value outside a dropdown's (radio's, checkbox group's) choices, which only an API call or a
stale page sends, is refused by gradio with a message naming the value but not the field; this
names the field by its label."""
from __future__ import annotations

import copy

import gradio as gr


def is_bare_skip(value) -> bool:
    return isinstance(value, dict) and value == {"__type__": "update"}


class Blocks(gr.Blocks):
    async def preprocess_data(self, block_fn, inputs, state, explicit_call: bool = False):
        try:
            return await super().preprocess_data(block_fn, inputs, state, explicit_call)
        except gr.Error as error:
            raise _named_choice_error(block_fn, inputs, state) or error from None

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


def _named_choice_error(block_fn, inputs, state) -> gr.Error | None:
    """The error for the first input whose value is not one of its choices, naming its label;
    None if no such input (the error was something else)."""
    for index, block in enumerate(block_fn.inputs):
        if getattr(block, "choices", None) is None or block.stateful or index >= len(inputs):
            continue
        if state is not None and block._id in state:
            block = state[block._id]  # this session's copy (its choices may have been updated)
        try:
            block.preprocess(inputs[index])
        except gr.Error:
            label = block.label or block.elem_id or type(block).__name__
            choices = ", ".join(str(value) for _, value in block.choices)
            if len(choices) > 300:
                choices = choices[:300] + " …"
            shown = repr(inputs[index])
            shown = shown if len(shown) <= 80 else shown[:80] + " …"
            return gr.Error(f"{label}: {shown} is not one of the choices ({choices})")
        except Exception:  # another kind of failure: not ours to rename
            continue
    return None
