"""The method catalog: every method is one record, and a method registered only here (a toy)
shows up in the CLI, run history, job names, Compare and Use this checkpoint."""
import contextlib
import dataclasses
import importlib.util
import json
from dataclasses import dataclass
from pathlib import Path

import pytest

from core.config import ConfigError, accept, check_limits, option
from core.paths import Paths
from trainers import catalog, families
from trainers.configs import NamesFiles


@dataclass
class ToyConfig(NamesFiles):
    output_name: str = option("", "Name of the toy file.", label="Output name")
    model: str = option("tiny-demo", "Base model.", label="Base model", path="model")
    steps: int = option(2, "How many steps.", label="Steps", min=1, max=100)

    def validate(self):
        problems = check_limits(self)
        if not self.output_name.strip():
            problems.append("output_name: required")
        return accept(self, problems)

    def file_problems(self, paths):
        return super().file_problems(paths) + (
            ["output_name: 'taken' is reserved by the toy"] if self.output_name == "taken" else [])


def toy_run(cfg: ToyConfig, ctx) -> Path:
    folder = ctx.paths.models / "toys"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{cfg.output_name}.toy"
    path.write_text(f"steps={cfg.steps}")
    return path


APPLIED = []


@contextlib.contextmanager
def toy_apply(spec, paths, model, path, partners):
    APPLIED.append(Path(path).name)
    yield model, (lambda strength: APPLIED.append(strength)), None


TOY = catalog.Method("toy", "Toy method", ToyConfig, f"{__name__}:toy_run",
                     final_folder="models/toys", suffixes=(".toy",), strength=True,
                     apply=f"{__name__}:toy_apply", families=("sd1",), help="a test's method")


@pytest.fixture
def toy():
    catalog.register(TOY)
    yield TOY
    catalog.unregister("toy")


def test_every_method_is_one_complete_record():
    titles = [m.title for m in catalog.methods()]
    assert len(set(titles)) == len(titles)
    for method in catalog.methods():
        assert dataclasses.is_dataclass(method.config), method.name
        fields = {f.name for f in dataclasses.fields(method.config)}
        assert method.target_field in fields, method.name
        module, _, function = method.run.partition(":")
        assert importlib.util.find_spec(module) is not None and function, method.name
        assert set(method.families) <= set(families.names())
    assert {"textual_inversion", "lora", "dreambooth"} <= set(catalog.names())


def test_reading_the_catalog_imports_no_torch():
    import subprocess
    import sys
    code = ("import sys; sys.path.insert(0, '.'); from trainers import catalog; "
            "[m.config for m in catalog.methods()]; assert 'torch' not in sys.modules")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=Path(__file__).resolve().parents[1])
    assert out.returncode == 0, out.stderr


def test_unknown_method_and_double_registration_are_refused(toy):
    with pytest.raises(KeyError, match="unknown method 'nope'; known: .*toy"):
        catalog.get("nope")
    with pytest.raises(ValueError, match="already registered"):
        catalog.register(dataclasses.replace(TOY, title="Another toy"))
    catalog.register(TOY)  # the same record again is harmless


def test_toy_method_runs_from_the_cli_and_is_listed(toy, tmp_path, capsys):
    from trainers.__main__ import main
    assert main(["--list"]) == 0
    listed = capsys.readouterr().out
    assert "toy" in listed and "Toy method" in listed and "a test's method" in listed
    code = main(["toy", "--data-dir", str(tmp_path), "--set", "output_name=first",
                 "--set", "steps=3"])
    assert code == 0
    assert (tmp_path / "models" / "toys" / "first.toy").read_text() == "steps=3"
    assert main(["toy", "--data-dir", str(tmp_path), "--set", "steps=0"]) == 2
    assert "output_name: required" in capsys.readouterr().err


def test_toy_method_is_a_job_with_its_title(toy):
    from webui.jobs import job_parts
    name, kind, fn, spec = job_parts("toy", ToyConfig(output_name="mine").validate())
    assert name == "Toy method: mine" and kind == "train" and spec["method"] == "toy"
    with pytest.raises(KeyError, match="unknown method"):
        job_parts("nope", ToyConfig(output_name="x"))


def test_toy_runs_show_in_run_history_and_its_files_go_to_its_folder(toy, tmp_path):
    from trainers import runs
    paths = Paths(tmp_path)
    folder = paths.outputs / "toy" / "2026-12-07" / "first"
    folder.mkdir(parents=True)
    (folder / "settings-0.json").write_text(json.dumps({"method": "toy", "output_name": "first"}))
    found = runs.scan_runs(paths)
    assert [r.method for r in found] == ["toy"]
    assert "Toy method" in found[0].title
    assert runs.final_folder(paths, "toy") == tmp_path / "models" / "toys"
    from trainers.checkpoint_use import existing_files
    (tmp_path / "models" / "toys").mkdir(parents=True)
    (tmp_path / "models" / "toys" / "first.toy").write_text("x")
    assert [p.name for p in existing_files(paths, "toy", "first")] == ["first.toy"]


def test_toy_checkpoints_compare_through_its_own_applier(toy, tmp_path):
    from trainers.compare import CompareSpec, _applied
    spec = CompareSpec(method="toy", model="tiny-demo", token="first",
                       checkpoints=[("step 1", str(tmp_path / "a.toy"))], prompts=["a toy"],
                       seeds=[1], strengths=[0.5, 1.0])
    assert spec.validate() is spec and spec.uses_strength
    assert len(spec.rows()) == 2
    APPLIED.clear()
    with _applied(spec, Paths(tmp_path), "the model", tmp_path / "a.toy") as (model, strength, _):
        assert model == "the model"
        strength(0.5)
    assert APPLIED == ["a.toy", 0.5]
    plain = dataclasses.replace(TOY, name="plain", title="Plain", apply=None)
    catalog.register(plain)
    try:
        with pytest.raises(ConfigError, match="comparing plain checkpoints is not supported"):
            dataclasses.replace(spec, method="plain").validate()
    finally:
        catalog.unregister("plain")


def test_toy_method_gets_a_form_and_a_place_in_the_train_tabs_picker(toy, tmp_path):
    import gradio as gr

    from core.jobs import JobRunner
    from webui import tab_train
    from webui.method_forms import method_forms
    form = next(f for f in method_forms() if f.key == "toy")
    assert form.title == "Toy method" and form.top == ["output_name", "model"]
    assert form.groups == [("Settings", ["steps"], True)]
    paths = Paths(tmp_path / "data").ensure()
    runner = JobRunner(paths, worker_process=False)
    try:
        with gr.Blocks():
            parts = tab_train.build(paths, runner)
        picker = parts["restore"][1][0]  # the method picker, first of what a reload restores
        assert isinstance(picker, gr.Radio)
        assert ("Toy method", "toy") in [tuple(choice) for choice in picker.choices]
        assert "toy" in [f.key for f in parts["forms"]]
    finally:
        runner.shutdown(timeout=5)


def test_a_config_owns_its_file_checks_which_the_preflight_runs(toy, tmp_path):
    from trainers.preflight import check_before_queueing
    paths = Paths(tmp_path, confine=True)
    check_before_queueing(ToyConfig(output_name="fine"), paths)
    with pytest.raises(ConfigError, match="'taken' is reserved"):
        check_before_queueing(ToyConfig(output_name="taken"), paths)
    with pytest.raises(ConfigError, match="model"):  # the marked path field, confined
        check_before_queueing(ToyConfig(output_name="fine", model="/etc/passwd"), paths)


def test_a_method_lays_out_its_form_in_its_config_and_unknown_tools_are_refused(toy):
    from trainers.config_forms import FormLayout
    from webui.method_forms import method_forms

    @dataclass
    class LaidOut(ToyConfig):
        form = FormLayout([("Toy settings", ["steps"], True)], top=["output_name", "model"])

    catalog.unregister("toy")
    catalog.register(dataclasses.replace(TOY, config=LaidOut))
    form = next(f for f in method_forms() if f.key == "toy")
    assert form.groups == [("Toy settings", ["steps"], True)] and form.config is LaidOut
    LaidOut.form = FormLayout([("Toy settings", ["steps"], True)], tools=("no_such_tool",))
    with pytest.raises(ValueError, match="Toy method: unknown form tool.*no_such_tool"):
        method_forms()


@pytest.mark.parametrize("marks, method", [
    (("hypernetwork_loss.csv", "hypernetworks/"), "hypernetwork"),
    (("textual_inversion_loss.csv", "embeddings/"), "textual_inversion"),
    (("embeddings/",), "textual_inversion"),
    (("loss.csv",), "lora")])
def test_a_run_folder_without_a_method_is_told_by_the_catalogs_run_marks(tmp_path, marks, method):
    """A1111's own log folders carry settings without Danlu's `method`: the method whose loss
    CSV or checkpoint folder is there owns the run; a kohya-style folder is a LoRA run."""
    from trainers import runs
    paths = Paths(tmp_path).ensure()
    folder = paths.outputs / "2026-12-07" / "mine"
    folder.mkdir(parents=True)
    (folder / "settings-0.json").write_text(json.dumps({"learn_rate": "0.005"}))
    for mark in marks:
        (folder / mark).mkdir() if mark.endswith("/") else \
            (folder / mark).write_text("step,epoch,epoch_step,loss\n1,0,1,0.5\n")
    [run] = runs.scan_runs(paths, roots=[paths.outputs])
    assert run.method == method
    assert [round(loss[1], 3) for loss in run.losses] == ([0.5] if any("csv" in m for m in marks)
                                                          else [])
