import dataclasses

from webui.method_forms import method_forms


def test_every_config_field_has_exactly_one_control_in_its_form():
    for form in method_forms():
        listed = form.top + [name for _, names, _ in form.groups for name in names]
        assert len(listed) == len(set(listed)), form.key
        assert not set(listed) & set(form.hidden), form.key
        assert set(listed) | set(form.hidden) == {f.name for f in dataclasses.fields(form.config)}, form.key


# ---------------------------------------------------------------- the Train tab, built for real

import pytest  # noqa: E402


@pytest.fixture
def train_tab(tmp_path):
    """The Train tab of a data folder with one embedding, on a runner that trains nothing."""
    import gradio as gr

    from core.jobs import JobRunner
    from core.paths import Paths
    from webui import tab_train
    paths = Paths(tmp_path / "data").ensure()
    (paths.embeddings / "early.pt").write_bytes(b"never loaded")
    runner = JobRunner(paths, worker_process=False)
    with gr.Blocks() as blocks:
        parts = tab_train.build(paths, runner)
    yield paths, runner, blocks, parts
    runner.shutdown(timeout=5)


def handlers(blocks, name: str) -> list:
    return [fn for fn in blocks.fns.values() if fn.name == name]


def form_of(parts, key):
    return next(f for f in parts["forms"] if f.key == key)


def test_each_forms_buttons_send_only_that_forms_controls(train_tab):
    _, _, blocks, parts = train_tab
    forms = parts["forms"]
    for name in ("start", "add_to_queue", "export_toml", "estimate_memory"):
        found = handlers(blocks, name)
        assert len(found) == len(forms), name
        for form, block_fn in zip(forms, found):
            own = [c._id for c in form.controls.values()]
            sent = [c._id for c in block_fn.inputs if c.elem_id != "train-processes"]
            assert sent == own, (name, form.key)


def test_only_the_poll_writes_the_queue_view(train_tab):
    """A job queued by one click can start before that click's answer reaches the page; an
    answer that also wrote the queue could then overwrite the poll's newer text for good."""
    _, _, blocks, _ = train_tab
    queue_view = next(b for b in blocks.blocks.values() if getattr(b, "elem_id", None) == "train-queue")
    for block_fn in handlers(blocks, "add_to_queue") + handlers(blocks, "start"):
        assert queue_view._id not in [c._id for c in block_fn.outputs]
    assert any(queue_view._id in [c._id for c in fn.outputs] for fn in handlers(blocks, "poll"))


def test_a_lora_click_ignores_a_textual_inversion_value_that_no_longer_exists(train_tab, tmp_path):
    from webui.forms import to_config
    paths, runner, blocks, parts = train_tab
    lora = form_of(parts, "lora")
    start = handlers(blocks, "start")[parts["forms"].index(lora)]
    values = [c.value for c in lora.controls.values()]
    values[lora.names.index("output_name")] = "mylora"
    values[lora.names.index("train_data_dir")] = str(tmp_path / "missing")
    answer = start.fn(1, *values)
    # the LoRA form's own check runs (its dataset is missing); nothing about any embedding
    assert "train_data_dir" in answer and "mbedding" not in answer
    assert to_config(lora.config, lora.names, values).output_name == "mylora"


def choice_values(update) -> list:
    from webui.choices import value_of
    return [value_of(c) for c in update["choices"]]


def restored(parts):
    restore, outputs = parts["restore"]
    return dict(zip([id(o) for o in outputs], restore())), restore()[-1]


def test_a_reload_reads_dropdown_choices_now_and_restores_a_file_created_later(train_tab):
    import gradio as gr

    from trainers.configs import TextualInversionConfig
    paths, runner, _, parts = train_tab
    (paths.embeddings / "later.pt").write_bytes(b"never loaded")  # created after the page
    cfg = TextualInversionConfig(model="tiny-demo", embedding="later", data_root="x", width=96)
    runner.wait(runner.submit("ti", "train", lambda ctx: None, config=cfg), 10)
    by_output, note = restored(parts)
    ti = form_of(parts, "textual_inversion")
    embedding = by_output[id(ti.controls["embedding"])]
    assert embedding["value"] == "later" and "later" in choice_values(embedding)
    assert by_output[id(ti.controls["width"])]["value"] == 96
    # the other forms' dropdowns get today's choices too
    apt = by_output[id(form_of(parts, "apt").controls["embedding"])]
    assert "later" in choice_values(apt)
    assert note == gr.skip()  # nothing was cleared


def test_a_restored_value_that_was_deleted_is_cleared_with_a_note(train_tab):
    from trainers.configs import TextualInversionConfig
    paths, runner, blocks, parts = train_tab
    cfg = TextualInversionConfig(model="gone-model.safetensors", embedding="deleted",
                                 data_root="x", template="missing.txt")
    runner.wait(runner.submit("ti", "train", lambda ctx: None, config=cfg), 10)
    by_output, note = restored(parts)
    ti = form_of(parts, "textual_inversion")
    assert by_output[id(ti.controls["embedding"])]["value"] is None
    assert by_output[id(ti.controls["model"])]["value"] == "tiny-demo"
    template = by_output[id(ti.controls["template"])]
    assert template["value"] in choice_values(template)
    for text in ("`deleted` no longer exists", "`gone-model.safetensors`", "`missing.txt`"):
        assert text in note
    # and a LoRA click from that page works (its form alone is validated)
    lora = form_of(parts, "lora")
    start = handlers(blocks, "start")[parts["forms"].index(lora)]
    values = [c.value for c in lora.controls.values()]
    values[lora.names.index("output_name")] = "mylora"
    answer = start.fn(1, *values)
    assert "Please fix" in answer and "train_data_dir" in answer and "deleted" not in answer


def test_choosing_a_demo_model_sets_the_size_fields_and_a_real_model_does_not(train_tab):
    import gradio as gr
    _, _, blocks, parts = train_tab
    follow = handlers(blocks, "sizes_for_model")
    by_form = {f.key: fn for f in parts["forms"] for fn in follow
               if fn.inputs[0] is f.controls.get("model")}
    ti, lora = by_form["textual_inversion"], by_form["lora"]
    assert [c.elem_id.split("-")[1] for c in ti.outputs] == ["width", "height"]
    assert [u["value"] for u in ti.fn("tiny-demo", 512, 512)] == [64, 64]
    assert [u["value"] for u in ti.fn("tiny-demo-sdxl", 320, 512)] == [64, 64]
    # a real model: the sizes the user typed stay; the demo's size goes back to the default
    assert ti.fn("real.safetensors", 320, 448) == [gr.skip(), gr.skip()]
    assert ti.fn("real.safetensors", 64, 448) == [gr.update(value=512), gr.skip()]
    assert [c.elem_id.split("-")[1] for c in lora.outputs] == ["resolution", "min_bucket_reso"]
    assert [u["value"] for u in lora.fn("tiny-demo", 512, 256)] == [64, 64]
    assert [u["value"] for u in lora.fn("real", 64, 64)] == [512, 256]
    # bad input: a value that is no model name changes nothing it should not, and raises nothing
    assert ti.fn({"a": 1}, 320, 448) == [gr.skip(), gr.skip()]
    assert "extract_lora" not in by_form  # no size fields


def test_with_only_demo_models_the_forms_start_at_the_demo_size(train_tab, tmp_path):
    import gradio as gr

    from core.jobs import JobRunner
    from webui import tab_train
    _, _, _, parts = train_tab  # its data folder has no real model
    ti = form_of(parts, "textual_inversion")
    assert (ti.controls["width"].value, ti.controls["height"].value) == (64, 64)
    assert form_of(parts, "dreambooth").controls["resolution"].value == 64
    from core.paths import Paths
    paths = Paths(tmp_path / "real").ensure()
    (paths.stable_diffusion / "real.safetensors").write_bytes(b"never loaded")
    runner = JobRunner(paths, worker_process=False)
    with gr.Blocks():
        real = tab_train.build(paths, runner)
    runner.shutdown(timeout=5)
    assert form_of(real, "textual_inversion").controls["width"].value == 512
    assert form_of(real, "lora").controls["resolution"].value == 512
