"""Bad input everywhere: every field of every config (the CLI's TOML and --set) and every input
of every event handler of the page gets malformed values; each is refused with a message naming
the field, or accepted, and nothing raises.

Fields and handlers are found by introspection (dataclasses.fields, the Blocks' event list), so
a new field or a new button is covered without editing this file. Nothing trains: the page gets
a runner that records what would be queued. Paths are confined, as in a shared app."""
from __future__ import annotations

import dataclasses
import inspect
import re
import typing
from types import SimpleNamespace

import pytest

from core.config import ConfigError, _base_type, from_dict
from core.jobs import Job, JobRunner
from core.paths import Paths

OUTSIDE = "../outside"
WRONG_TYPES = [{"a": 1}, [{"b": 2}]]
NOT_NUMBERS = ["nan", "inf", "-inf", float("nan"), float("inf"), "abc", "", "1e999",
               10**30, -10**30, 1e300, True]
NOT_BOOLS = ["maybe", 2, "", 0.5]
ODD_TEXT = ["", "   ", "名前🙂\u202e", "x" * 5000, "a\x00b", "../etc", "/etc/passwd", "~/x",
            "nan", "-1"]
PATHS_OUT = [OUTSIDE, "/etc", "datasets/../../outside", "a\x00b", "~"]
NAMES_OUT = ["../evil", "/etc/evil", "a/b", ".hidden", "a\x00b"]
# values that name an existing thing in the fixture, so the untouched fields are all valid
VALID = {"model": "tiny-demo", "embedding": "fuzzemb", "hypernetwork": "fuzzhn",
         "data_root": "datasets/cats", "train_data_dir": "datasets/cats", "name": "fuzzname",
         "output_name": "fuzzout", "checkpoint": "other-model", "source": "datasets/cats",
         "destination": "datasets/out", "in_json": "datasets/cats.json",
         "aesthetic_embedding": "fuzzlook", "lora": "fuzzlora.safetensors",
         "loras": "fuzzlora.safetensors: 0.5, fuzzlora2.safetensors",
         "run_folder": "datasets/cats"}


def config_classes() -> list[type]:
    import trainers.configs as configs
    from preprocess.config import PreprocessConfig
    found = [v for v in vars(configs).values()
             if dataclasses.is_dataclass(v) and v.__module__ == configs.__name__
             and hasattr(v, "validate")]  # the shared bases are checked through their methods
    return found + [PreprocessConfig]


def kind_of(cls, name: str):
    """(base type, item type for lists)."""
    base, _ = _base_type(typing.get_type_hints(cls)[name])
    origin = typing.get_origin(base) or base
    item = (typing.get_args(base) or (str,))[0] if origin is list else None
    return origin, item


def must_refuse(cls, field: dataclasses.Field) -> list:
    """Values this field must refuse, with a message naming it."""
    origin, item = kind_of(cls, field.name)
    values = list(WRONG_TYPES)
    if origin in (int, float) or item in (int, float):
        values += NOT_NUMBERS if origin is not list else [[v] for v in NOT_NUMBERS if v != ""]
    elif origin is bool:
        values += NOT_BOOLS
    elif origin is str and field.metadata.get("choices"):
        values += ["名前🙂", "", "../x"]
    elif origin is str and field.metadata.get("path"):
        values += PATHS_OUT
    elif origin is str and (field.name == "name" or field.name.endswith("_name")):
        values += NAMES_OUT
    return values


def may_accept(cls, field: dataclasses.Field) -> list:
    """Values that may be accepted or refused, but must not raise anything else."""
    origin, _ = kind_of(cls, field.name)
    if origin in (int, float):
        return [-1, 0, -0.0, 1.5, "7", " 8 ", None]
    if origin is list:
        return ["", "1, 2", [], ["名前"], None]
    return ODD_TEXT + [None, 5, 1.5]


@pytest.fixture(scope="module")
def layout(tmp_path_factory):
    from tests.conftest import photo
    root = tmp_path_factory.mktemp("fuzz")
    data = root / "data"
    paths = Paths(data, confine=True).ensure()
    (root / "outside").mkdir()
    photo(0).save(root / "outside" / "0.png")
    (data / "datasets" / "cats").mkdir(parents=True)
    for i in range(2):
        photo(i).save(data / "datasets" / "cats" / f"{i}.png")
    (data / "datasets" / "cats.json").write_text('{"0": {"caption": "a cat"}, "1": {"tags": "cat"}}')
    (data / "embeddings" / "fuzzemb.pt").write_bytes(b"never loaded")
    (data / "models" / "hypernetworks" / "fuzzhn.pt").write_bytes(b"never loaded")
    (data / "models" / "Lora" / "fuzzlora.safetensors").write_bytes(b"never loaded")
    (data / "models" / "Lora" / "fuzzlora2.safetensors").write_bytes(b"never loaded")
    return paths


def base_values(cls) -> dict:
    defaults = {f.name: getattr(cls(), f.name) for f in dataclasses.fields(cls)}
    return {**defaults, **{k: v for k, v in VALID.items() if k in defaults}}


def check(cls, data: dict, paths: Paths):
    """What the CLI, the page and the queue run before a job: coerce, validate, file checks."""
    from preprocess.config import PreprocessConfig
    from trainers.preflight import check_before_queueing
    cfg = from_dict(cls, data)
    if cls is PreprocessConfig:
        cfg.validate(paths)
    else:
        cfg.validate()
        check_before_queueing(cfg, paths)
    return cfg


def named(error: ConfigError, field: str) -> bool:
    """Some problem names the field (as a whole word: 'seed' is not 'preview_seed')."""
    word = re.compile(rf"(?<![\w]){re.escape(field)}(?![\w])")
    return any(word.search(p) for p in error.problems)


def test_every_config_field_refuses_malformed_values_by_name(layout):
    classes = config_classes()
    assert len(classes) >= 8
    count, wrong = 0, []
    for cls in classes:
        base = base_values(cls)
        check(cls, base, layout)  # the untouched values are valid: any refusal is the field's
        for field in dataclasses.fields(cls):
            for must, value in [(True, v) for v in must_refuse(cls, field)] + \
                    [(False, v) for v in may_accept(cls, field)]:
                count += 1
                try:
                    check(cls, {**base, field.name: value}, layout)
                except ConfigError as error:
                    if not named(error, field.name):
                        wrong.append((cls.__name__, field.name, value, error.problems))
                    continue
                except Exception as error:  # anything else would reach the page as "Error"
                    wrong.append((cls.__name__, field.name, value, repr(error)))
                    continue
                if must:
                    wrong.append((cls.__name__, field.name, value, "accepted"))
    assert not wrong, "\n".join(map(repr, wrong))
    assert count > 1000


def test_fields_that_name_files_are_marked_as_paths():
    """A new folder/file field must say so (option(path=...)) to be confined when shared."""
    hints = ("_dir", "_directory", "_root", "dataset_config", "source", "destination", "model",
             "checkpoint")
    for cls in config_classes():
        for field in dataclasses.fields(cls):
            origin, _ = kind_of(cls, field.name)
            if origin is str and field.name.endswith(hints):
                assert field.metadata.get("path"), (cls.__name__, field.name)


def test_a_cli_toml_with_malformed_values_names_each_field(tmp_path):
    from core.config import load_toml
    from trainers.configs import LoraConfig
    toml = tmp_path / "run.toml"
    toml.write_text('network_dim = "lots"\nlearning_rate = nan\nseed = 1e40\n'
                    'flip_aug = "perhaps"\n', encoding="utf-8")
    with pytest.raises(ConfigError) as caught:
        load_toml(LoraConfig, toml, ["max_train_steps=inf", "keep_tokens=-5"]).validate()
    for field in ["network_dim", "learning_rate", "flip_aug", "max_train_steps"]:
        assert named(caught.value, field), (field, caught.value.problems)
    with pytest.raises(ConfigError) as caught:  # values of the right type, out of range
        load_toml(LoraConfig, None, ["keep_tokens=-5", "seed=1e40", "save_every_n_steps=1e12",
                                     "unet_lr=1e300"]).validate()
    for field in ["keep_tokens", "seed", "save_every_n_steps", "unet_lr"]:
        assert named(caught.value, field), (field, caught.value.problems)


# --- the page: every input of every event handler ----------------------------------------------

class RecordingRunner(JobRunner):
    """Records what the page would queue; never runs it."""

    def __init__(self, paths):
        super().__init__(paths)
        self.submitted = []

    def submit(self, name, kind, fn, config=None, queue=False, spec=None):
        self.submitted.append(config)
        return Job(id=len(self.submitted), name=name, kind=kind, fn=fn, config=config, spec=spec)


def texts(result) -> str:
    """Every string a handler returned (in updates too), joined."""
    found = []

    def walk(value):
        if isinstance(value, str):
            found.append(value)
        elif isinstance(value, dict):
            for item in value.values():
                walk(item)
        elif isinstance(value, (list, tuple)):
            for item in value:
                walk(item)
        elif hasattr(value, "__dict__") and not isinstance(value, type):
            walk({k: v for k, v in vars(value).items() if k in ("value", "choices", "label")})
    walk(result)
    return "\n".join(found)


def call(block_fn, values: list, event=None):
    import gradio as gr
    fn = block_fn.fn
    params = list(inspect.signature(fn).parameters.values())
    args = list(values)
    for index, param in enumerate(params):
        if "SelectData" in str(param.annotation) or "EventData" in str(param.annotation):
            args.insert(index, event or SimpleNamespace(index=0, value="x", row_value=["x", 1],
                                                        selected=True))
    try:
        return fn(*args), None
    except gr.Error as error:  # an intended message, shown as a notice
        return None, error


ACCEPTED = ("Started job", "Queued job", "Created `")
# show a config or an estimate, touch no file: types matter
READ_ONLY = {"export_toml", "estimate_memory", "fit_my_gpu"}


def handler_values(cls, field) -> tuple[list, list]:
    """A few values per config field for the page (the config test above tries them all):
    (must refuse, may accept)."""
    refuse = must_refuse(cls, field)
    return refuse[:1] + refuse[len(WRONG_TYPES):len(WRONG_TYPES) + 1], [None, "名前🙂\u202e"]


OTHER_VALUES = WRONG_TYPES + NOT_NUMBERS[:8] + ODD_TEXT + [None, -1, 10**30, 2.5]


def test_every_handler_of_every_tab_answers_malformed_input_without_a_traceback(layout,
                                                                              monkeypatch):
    import gradio as gr

    import trainers.embeddings
    import trainers.hypernetworks
    from webui.app import build_app
    from webui.method_forms import method_forms
    for module, name in [(trainers.embeddings, "create_embedding"),
                         (trainers.hypernetworks, "create_hypernetwork")]:  # validate only
        monkeypatch.setattr(module, name, lambda cfg, paths: layout.outputs / "created")
    runner = RecordingRunner(layout)
    blocks = build_app(layout, runner)
    classes = {cls.__name__: cls for cls in config_classes()}
    method_of = {form.config.__name__: form.key for form in method_forms()}
    handlers = [fn for fn in blocks.fns.values() if fn.fn is not None]
    assert len(handlers) >= 30
    fuzzed_fields: set[tuple[str, str]] = set()
    wrong = []
    seen_inputs = set()  # another button on the same form gets fewer values
    for block_fn in handlers:
        inputs = list(block_fn.inputs)
        ids = [getattr(c, "elem_id", None) or "" for c in inputs]
        again = tuple(c._id for c in inputs) in seen_inputs
        seen_inputs.add(tuple(c._id for c in inputs))
        fields = []
        for elem_id in ids:
            cls_name, _, name = elem_id.partition("-")
            cls = classes.get(cls_name)
            fields.append(next((f for f in dataclasses.fields(cls) if f.name == name), None)
                          if cls else None)

        def base(for_method: str | None = None) -> list:
            values = []
            for component, elem_id in zip(inputs, ids):
                cls_name, _, name = elem_id.partition("-")
                if elem_id == "train-method":
                    values.append(for_method or component.value)
                elif cls_name in classes and name in VALID:
                    values.append(VALID[name])
                else:
                    values.append(component.value)
            return values

        def run(values, where, event=None):
            try:
                result, notice = call(block_fn, values, event)
            except Exception as error:  # the page would show a bare "Error"
                wrong.append((*where, repr(error)[:200]))
                return None
            shown = texts(result) if notice is None else str(notice)
            if "Traceback" in shown:
                wrong.append((*where, "traceback"))
            return shown

        # a handler validates a form if a wrong type in its first config field is refused
        first = next((i for i, f in enumerate(fields) if f is not None), None)
        validating = False
        if first is not None:
            values = base(method_of.get(ids[first].partition("-")[0]))
            values[first] = WRONG_TYPES[0]
            validating = "Please fix" in (run(values, (block_fn.name, "probe", None)) or "")
        run(base(), (block_fn.name, "baseline", None))
        acting = block_fn.name not in READ_ONLY
        for index, (component, elem_id, field) in enumerate(zip(inputs, ids, fields)):
            if isinstance(component, gr.State):
                continue  # server-side values: a browser cannot send them
            cls_name, _, name = elem_id.partition("-")
            method = method_of.get(cls_name)
            if field is None:
                cases = [(False, v) for v in OTHER_VALUES]
            else:
                refuse, others = handler_values(classes[cls_name], field)
                if again:
                    refuse, others = refuse[:1], []
                if not acting:  # export and estimate touch no files: only types matter
                    refuse = [v for v in refuse if v not in PATHS_OUT + NAMES_OUT]
                cases = [(validating, v) for v in refuse] + [(False, v) for v in others]
            for must, value in cases:
                values = base(method)
                values[index] = value
                where = (block_fn.name, elem_id or type(component).__name__, value)
                shown = run(values, where)
                if shown is None or not must:
                    continue
                if any(text in shown for text in ACCEPTED) or name not in shown or \
                        "Please fix" not in shown:
                    wrong.append((*where, shown[:200]))
            if field is not None and validating:
                fuzzed_fields.add((cls_name, name))
        if any("SelectData" in str(p.annotation)
               for p in inspect.signature(block_fn.fn).parameters.values()):
            for event_value in [None, -1, 10**9, "x", (0, 0), [5, 5], {"a": 1}]:
                event = SimpleNamespace(index=event_value, value=event_value,
                                        row_value=event_value, selected=True)
                run(base(), (block_fn.name, "event", event_value), event)
    assert not wrong, "\n".join(map(repr, wrong))
    # every field of every form went through a handler that validates it
    for form in method_forms():
        for field in dataclasses.fields(form.config):
            if field.name in form.hidden:  # not on the page: stays at its default
                continue
            assert (form.config.__name__, field.name) in fuzzed_fields, (form.key, field.name)
    from preprocess.config import PreprocessConfig
    for field in dataclasses.fields(PreprocessConfig):
        assert ("PreprocessConfig", field.name) in fuzzed_fields, field.name
    assert runner.submitted and all(cfg is not None for cfg in runner.submitted)


def test_numbers_gradio_cannot_read_reach_the_validation_through_gradio(layout):
    """Through gradio's own preprocessing (what an API call goes through), text in a number
    field is not a bare gradio "Error" but the form's message naming the field: every number
    control of a config field hands what it cannot read on, and one end-to-end call per form
    button shows the message."""
    import asyncio
    from concurrent.futures import ThreadPoolExecutor

    import gradio as gr

    from webui.app import build_app
    from webui.method_forms import method_forms
    blocks = build_app(layout, RecordingRunner(layout))
    classes = {cls.__name__ for cls in config_classes()}
    method_of = {form.config.__name__: form.key for form in method_forms()}
    numbers = 0
    for block_fn in blocks.fns.values():
        ids = [getattr(c, "elem_id", None) or "" for c in block_fn.inputs]
        fields = [(i, c) for i, c in enumerate(block_fn.inputs) if isinstance(c, gr.Number)
                  and ids[i].partition("-")[0] in classes]
        for _, component in fields:
            for junk in ["abc", "nan", float("inf"), {"a": 1}]:
                assert component.preprocess(junk) is junk or component.preprocess(junk) == junk
            numbers += 1
        if block_fn.name not in ("start", "create") or not fields:
            continue
        index, component = fields[-1]
        values = [c.value for c in block_fn.inputs]
        values[index] = "abc"
        if "train-method" in ids:  # the form this field belongs to
            values[ids.index("train-method")] = method_of[ids[index].partition("-")[0]]
        # in a thread of its own: after a browser test, playwright's sync API keeps an event
        # loop running in this one, where asyncio.run refuses to start
        with ThreadPoolExecutor(1) as pool:
            out = pool.submit(lambda: asyncio.run(blocks.process_api(
                block_fn=block_fn, inputs=values, state=None))).result()
        field = ids[index].partition("-")[2]
        shown = texts(out["data"])
        assert "Please fix" in shown and f"{field}: expected" in shown, (block_fn.name, shown)
    assert numbers > 50


def test_a_value_outside_a_dropdowns_choices_is_refused_naming_the_field(layout):
    """Through gradio's own preprocessing: a value that is not one of a dropdown's (radio's,
    checkbox group's) choices, which only an API call or a stale page sends, is refused with a
    message naming the field by its label, for every such input of every handler."""
    import asyncio
    from concurrent.futures import ThreadPoolExecutor

    import gradio as gr

    from webui.app import build_app
    blocks = build_app(layout, RecordingRunner(layout))
    checked, wrong, seen = 0, [], set()
    for block_fn in blocks.fns.values():
        for index, component in enumerate(block_fn.inputs):
            if getattr(component, "choices", None) is None or component.stateful or \
                    getattr(component, "allow_custom_value", False) or \
                    not block_fn.preprocess or component._id in seen:
                continue
            seen.add(component._id)  # once per control: a form's buttons share them
            for junk in ["not-a-choice-名前", 12345][checked % 2:][:1]:
                values = [c.value for c in block_fn.inputs]
                values[index] = [junk] if isinstance(component, gr.CheckboxGroup) else junk
                with ThreadPoolExecutor(1) as pool:  # playwright's loop may run in this thread
                    future = pool.submit(lambda: asyncio.run(blocks.process_api(
                        block_fn=block_fn, inputs=values, state=None)))
                    try:
                        future.result()
                    except gr.Error as error:
                        if not error.message.startswith(f"{component.label}: ") or \
                                repr(junk) not in error.message:
                            wrong.append((block_fn.name, component.label, error.message[:200]))
                    else:
                        wrong.append((block_fn.name, component.label, "accepted"))
                checked += 1
    assert not wrong, "\n".join(map(repr, wrong))
    assert checked >= 20, checked
