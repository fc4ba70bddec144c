"""webui.blocks.Blocks: a bare gr.skip() is sent as is, the other outputs as gradio does."""
from __future__ import annotations

import asyncio

import gradio as gr
from gradio.state_holder import SessionState

from webui.blocks import Blocks


def run_in_thread(coroutine):
    """asyncio.run in a thread of its own: after a browser test, playwright's sync API keeps an
    event loop running in the main thread, where asyncio.run refuses to start."""
    from concurrent.futures import ThreadPoolExecutor
    with ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, coroutine).result()


class Page:
    pass


def build():
    with Blocks() as demo:
        text, other = gr.Markdown("a"), gr.Markdown("b")
        gallery, state = gr.Gallery(), gr.State(Page())
        gr.Timer(1).tick(lambda page: page, state, [text, other, gallery, state], queue=False)
    return demo, next(iter(demo.fns.values())), state


def test_skips_pass_through_and_the_rest_is_postprocessed():
    demo, fn, state = build()
    session, page = SessionState(demo), Page()
    out = run_in_thread(demo.postprocess_data(fn, ["new", gr.skip(), [], page], session))
    assert out == ["new", {"__type__": "update"}, [], None] and session[state._id] is page


def test_only_the_state_left_is_stored_as_itself_not_in_a_list():
    demo, fn, state = build()
    session, page = SessionState(demo), Page()
    out = run_in_thread(demo.postprocess_data(fn, [gr.skip(), gr.skip(), gr.skip(), page], session))
    assert out == [{"__type__": "update"}] * 3 + [None] and session[state._id] is page
    out = run_in_thread(demo.postprocess_data(fn, [gr.skip()] * 4, session))
    assert out == [{"__type__": "update"}] * 3 + [None] and session[state._id] is page


def test_an_update_with_properties_still_goes_through_gradio():
    demo, fn, _ = build()
    session = SessionState(demo)
    out = run_in_thread(demo.postprocess_data(
        fn, [gr.update(visible=False), gr.skip(), gr.skip(), gr.skip()], session))
    assert out[0]["visible"] is False and out[0]["__type__"] == "update"
