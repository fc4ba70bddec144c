"""Shared fixtures: a tiny SD1-shaped model built once per session, small datasets of real photos."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):  # parallel test processes share the CPUs
    os.environ.setdefault("OMP_NUM_THREADS", str(max(
        1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"]))))


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    from trainers.tiny_model import build_tiny_model
    return build_tiny_model(tmp_path_factory.mktemp("models") / "tiny-demo")


def photo(index: int, size: int = 64):
    """A real photo from scikit-image's samples, resized (RGB PIL image)."""
    from PIL import Image
    from skimage import data
    names = ["astronaut", "coffee", "chelsea", "rocket", "camera", "hubble_deep_field"]
    array = getattr(data, names[index % len(names)])()
    return Image.fromarray(array).convert("RGB").resize((size, size))


def cli_embedding_run(tmp_path: Path, tiny_model_dir: Path, dataset: Path, steps: int):
    """A data folder with tiny-demo and the embedding 'clitok', and a run.toml training it for
    `steps` steps at 64 px without previews or periodic saves: (data folder, toml, embedding)."""
    import shutil

    from core.paths import Paths
    from trainers.configs import CreateEmbeddingConfig
    from trainers.embeddings import create_embedding
    data = tmp_path / "data"
    shutil.copytree(tiny_model_dir, data / ".cache" / "tiny-demo")
    path = create_embedding(CreateEmbeddingConfig(name="clitok", model="tiny-demo").validate(),
                            Paths(data).ensure())
    config = tmp_path / "run.toml"
    config.write_text(f'model = "tiny-demo"\nembedding = "clitok"\ndata_root = "{dataset}"\n'
                      f'width = 64\nheight = 64\nsteps = {steps}\npreview_every = 0\n'
                      'save_every = 0\n')
    return data, config, path


def demo_images_with_lora(paths, lora_path) -> tuple:
    """(image without, image with) the kohya LoRA file loaded by diffusers' load_lora_weights
    into the tiny SD1 demo, same prompt and seed: the check that a file loads and changes
    the output."""
    import torch
    from diffusers import StableDiffusionPipeline
    pipe = StableDiffusionPipeline.from_pretrained(paths.cache / "tiny-demo", safety_checker=None)
    pipe.set_progress_bar_config(disable=True)

    def image():
        return pipe("zxq cat", num_inference_steps=2, height=64, width=64,
                    generator=torch.Generator().manual_seed(0), output_type="np").images[0]
    base = image()
    pipe.load_lora_weights(str(lora_path))
    return base, image()


def kohya_photos(root: Path) -> Path:
    """A kohya repeats folder `2_zxq cat` under `root` with a square, a wide and a tall photo
    and their captions; returns `root`."""
    sub = root / "2_zxq cat"
    sub.mkdir(parents=True)
    for i, (w, h) in enumerate([(64, 64), (96, 64), (64, 96)]):
        photo(i, 96).resize((w, h)).save(sub / f"img{i}.png")
        (sub / f"img{i}.txt").write_text(f"zxq cat, photo {i}")
    return root


@pytest.fixture
def photo_dataset(tmp_path) -> Path:
    """Four 64 px photos with captions in <stem>.txt."""
    folder = tmp_path / "dataset"
    folder.mkdir()
    captions = ["a woman in a space suit", "a cup of coffee", "a cat", "a rocket"]
    for i, caption in enumerate(captions):
        photo(i).save(folder / f"{i:02}-img.png")
        (folder / f"{i:02}-img.txt").write_text(caption)
    return folder


class RecordingContext:
    """A job context that records events and can ask to stop after N progress events."""

    def __init__(self, paths, stop_after: int | None = None):
        self.paths = paths
        self.events = []
        self.stop_after = stop_after

    def emit(self, event):
        self.events.append(event)

    def should_stop(self) -> bool:
        from core.events import Progress
        done = sum(isinstance(e, Progress) for e in self.events)
        return self.stop_after is not None and done >= self.stop_after

    def of(self, kind):
        return [e for e in self.events if isinstance(e, kind)]

    @property
    def losses(self):
        from core.events import Progress
        return [e.loss for e in self.of(Progress)]


def repeat_with_interruption(run, cfg, paths, *, load, reset, stop_after: int = 2,
                             after_first=None):
    """Train `cfg` through, `reset()` its files to the start, train again stopped after
    `stop_after` steps (`after_first(path)` may check that state), then resume. Asserts that the
    losses and the final weights (`load(path)`: tensors in a dict or list) repeat the
    uninterrupted run bit for bit, and otherwise says where they part (tests/exact_resume.py);
    returns the three runs' contexts."""
    from tests import exact_resume as check
    whole = RecordingContext(paths)
    with check.StepRecorder() as whole_steps:
        path = run(cfg, whole)
    final = load(path)
    reset()
    first = RecordingContext(paths, stop_after=stop_after)
    with check.StepRecorder() as first_steps:
        run(cfg, first)
    if after_first is not None:
        after_first(path)
    second = RecordingContext(paths)
    with check.StepRecorder() as second_steps:
        run(cfg, second)
    found = [check.first_different_loss(whole.losses, first.losses + second.losses, stop_after),
             check.weight_differences(final, load(path))]
    if any(found):
        pytest.fail("the interrupted and resumed run does not repeat the uninterrupted one:\n  "
                    + "\n  ".join([text for text in found if text] + [
                        check.first_divergent_step(whole_steps, [first_steps, second_steps],
                                                   stop_after),
                        check.environment([whole_steps, first_steps, second_steps])]),
                    pytrace=False)
    return whole, first, second


@pytest.fixture
def pictures(tmp_path):
    """kohya_photos under the test's folder (a module may define its own)."""
    return kohya_photos(tmp_path / "train")


@pytest.fixture
def data_paths(tmp_path, tiny_model_dir):
    """A data folder whose tiny-demo model is the session's prebuilt one."""
    import shutil
    from core.paths import Paths
    paths = Paths(tmp_path / "data").ensure()
    shutil.copytree(tiny_model_dir, paths.cache / "tiny-demo")
    return paths


@pytest.fixture(scope="session")
def browser_type_launch_args():
    from tests.browser_support import CHROMIUM, CHROMIUM_ARGS
    return {"executable_path": CHROMIUM, "args": CHROMIUM_ARGS}


@pytest.fixture
def app_server(tmp_path, tiny_model_dir):
    from tests.browser_support import AppProcess
    server = AppProcess(tmp_path / "data", tiny_model_dir)
    yield server
    server.stop()


@pytest.fixture(scope="session")
def tiny_family_dirs(tmp_path_factory) -> dict:
    """The tiny SD2-shaped (v-prediction) and SDXL-shaped demo models, built once."""
    from trainers.families import demo_families
    from trainers.tiny_model import build_tiny_model
    root = tmp_path_factory.mktemp("family-models")
    return {name: build_tiny_model(root / name, family=family)
            for name, family in demo_families().items() if family != "sd1"}


@pytest.fixture
def family_paths(data_paths, tiny_family_dirs):
    """data_paths with the tiny SD2 and SDXL demo models prebuilt in its cache."""
    import shutil
    for name, folder in tiny_family_dirs.items():
        shutil.copytree(folder, data_paths.cache / name)
    return data_paths
