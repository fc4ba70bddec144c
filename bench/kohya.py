"""The second baseline: kohya's sd-scripts (what kohya_ss runs), unchanged, at Danlu's settings.

Never vendored. A checkout of a tagged release is found through
  $DANLU_SD_SCRIPTS           a folder holding sd-scripts' tree (train_network.py at its top)
  ~/.cache/danlu-bench/sd-scripts-<REV>-full   (or under $DANLU_BENCH_CACHE)
and written there from a git clone, with its own Python environment, by

    python -m bench.kohya setup --git-dir /path/to/sd-scripts/.git [--rev v0.10.1]

The environment (~/.cache/danlu-bench/sd-scripts-train-venv) sees this Python's torch through
--system-site-packages and gets the pins of the release's requirements.txt from PyPI
(accelerate, transformers, diffusers, ...; opencv as its headless build; not torch, bitsandbytes
or tensorboard), so sd-scripts runs with the library versions it is released with.

On the CPU sd-scripts needs two things from outside, neither a change to its code: its CLIP
tokenizer is read from `--tokenizer_cache_dir` (a copy of the model folder's tokenizer under the
hub id it would download), and `torchvision` comes from the benchmark's stand-in, as for the
diffusers scripts. It builds SD1.5's U-Net from its own fixed config, so only the SD1.5-shaped
model can be compared (the tiny one cannot be loaded by it).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from bench import fixtures

REV = "v0.10.1"
SCRIPTS = {"lora": "train_network.py", "lora_te": "train_network.py", "locon": "train_network.py",
           "dreambooth": "train_db.py", "textual_inversion": "train_textual_inversion.py"}
LABELS = {"lora": "train_network.py (U-Net only)", "lora_te": "train_network.py",
          "locon": "train_network.py conv_dim=4", "dreambooth": "train_db.py (U-Net only)",
          "textual_inversion": "train_textual_inversion.py"}
LEARNING_RATES = {"textual_inversion": 5e-3, "lora": 1e-4, "lora_te": 1e-4, "locon": 1e-4,
                  "dreambooth": 5e-6}
LORA_RANK = 4
NEVER = "1000000"
CLIP_ID = "openai/clip-vit-large-patch14"  # sd-scripts' SD1 tokenizer (strategy_sd.TOKENIZER_ID)
SKIPPED_REQUIREMENTS = ("torch", "bitsandbytes", "tensorboard", "-e")
BAR = "steps"  # sd-scripts' tqdm bar of optimizer steps


class BaselineMissing(RuntimeError):
    pass


def checkout_dir() -> Path:
    env = os.environ.get("DANLU_SD_SCRIPTS")
    return Path(env) if env else fixtures.bench_cache() / f"sd-scripts-{REV}-full"


def venv_dir() -> Path:
    return fixtures.bench_cache() / "sd-scripts-train-venv"


def python() -> Path:
    return venv_dir() / "bin" / "python"


def script_path(method: str, folder: Path | None = None) -> Path:
    if method not in SCRIPTS:
        raise BaselineMissing(f"sd-scripts has no script for {method}")
    path = (folder or checkout_dir()) / SCRIPTS[method]
    if not path.is_file():
        raise BaselineMissing(f"{path} not found; run `python -m bench.kohya setup --git-dir "
                              "<sd-scripts clone>/.git` or set DANLU_SD_SCRIPTS")
    if not python().is_file():
        raise BaselineMissing(f"no sd-scripts environment at {venv_dir()}; run "
                              "`python -m bench.kohya setup`")
    return path


def source_info(folder: Path | None = None) -> dict:
    try:
        return json.loads(((folder or checkout_dir()) / "SOURCE.json").read_text())
    except (OSError, ValueError):
        return {"rev": "unknown", "note": "origin not recorded"}


# ---------------------------------------------------------------- setup

def write_checkout(git_dir: Path, target: Path, rev: str = REV) -> dict:
    """sd-scripts' tree at `rev`, blob by blob (a partial clone may lack the Windows DLLs and
    other large files the benchmark never reads; those are listed, not fatal)."""
    git = ["git", "--git-dir", str(git_dir)]
    commit = subprocess.run(git + ["rev-parse", f"{rev}^{{commit}}"], capture_output=True,
                            text=True, check=True).stdout.strip()
    listing = subprocess.run(git + ["ls-tree", "-r", commit], capture_output=True, text=True,
                             check=True).stdout.splitlines()
    staging = target.with_name(target.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    missing = []
    for line in listing:
        meta, path = line.split("\t", 1)
        _, kind, sha = meta.split()
        if kind != "blob":
            continue
        blob = subprocess.run(git + ["cat-file", "blob", sha], capture_output=True)
        if blob.returncode:
            missing.append(path)
            continue
        out = staging / path
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_bytes(blob.stdout)
    if not (staging / "train_network.py").is_file():
        raise BaselineMissing(f"{rev} of {git_dir} has no train_network.py")
    info = {"rev": rev, "commit": commit, "missing_files": missing,
            "note": f"sd-scripts {rev} from {git_dir}"}
    (staging / "SOURCE.json").write_text(json.dumps(info, indent=1))
    shutil.rmtree(target, ignore_errors=True)
    staging.rename(target)
    return info


def pinned_requirements(folder: Path) -> list[str]:
    """requirements.txt's pins minus torch and the GPU / logging extras; opencv headless."""
    out = []
    for line in (folder / "requirements.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if not line or line.startswith(SKIPPED_REQUIREMENTS):
            continue
        out.append(line.replace("opencv-python==", "opencv-python-headless==")
                   .replace("diffusers[torch]", "diffusers"))
    return out


def make_venv(folder: Path) -> None:
    if not python().is_file():
        subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(venv_dir())],
                       check=True)
    subprocess.run([str(python()), "-m", "pip", "install", "-q", *pinned_requirements(folder)],
                   check=True)


# ---------------------------------------------------------------- commands

def tokenizer_cache(setup: dict, work: Path) -> Path:
    """The folder `--tokenizer_cache_dir` reads: the model's own tokenizer under the hub id."""
    target = work / "kohya-tokenizers"
    copy = target / CLIP_ID.replace("/", "_")
    if not copy.is_dir():
        shutil.copytree(Path(setup["model"]) / "tokenizer", copy)
    return target


def script_args(method: str, setup: dict, steps: int, seed: int, output_dir: Path,
                tokenizers: Path) -> list[str]:
    """sd-scripts' arguments at the benchmark's settings: Danlu's numbers (batch 1, fp32,
    constant rate, same steps / seed / size / rank, latents cached), no sampling, no saves
    before the end."""
    common = ["--pretrained_model_name_or_path", setup["model"],
              "--train_data_dir", setup["data"]["kohya"], "--caption_extension", ".txt",
              "--output_dir", str(output_dir), "--output_name", f"kohya-{method}",
              "--resolution", str(setup["resolution"]), "--train_batch_size", "1",
              "--max_train_steps", str(steps), "--learning_rate", f"{LEARNING_RATES[method]:g}",
              "--optimizer_type", "AdamW", "--lr_scheduler", "constant", "--seed", str(seed),
              "--mixed_precision", "no", "--save_precision", "float", "--cache_latents",
              "--sdpa", "--max_data_loader_n_workers", "0", "--save_every_n_epochs", NEVER,
              "--tokenizer_cache_dir", str(tokenizers)]
    if method == "textual_inversion":
        return common + ["--token_string", fixtures.EMBEDDING_NAME,
                         "--init_word", fixtures.INITIALIZER, "--num_vectors_per_token", "1",
                         "--use_object_template"]
    if method == "dreambooth":
        return common + ["--stop_text_encoder_training", "-1"]  # the U-Net only, as Danlu's run
    network = ["--network_module", "networks.lora", "--network_dim", str(LORA_RANK),
               "--network_alpha", str(LORA_RANK)]
    if method == "lora":
        return common + network + ["--network_train_unet_only"]
    if method == "locon":
        return common + network + ["--network_train_unet_only", "--network_args",
                                   f"conv_dim={LORA_RANK}", f"conv_alpha={LORA_RANK}"]
    return common + network  # lora_te: U-Net and text encoder at the same rate


def command(method: str, setup: dict, steps: int, seed: int, output_dir: Path) -> list[str]:
    timer = Path(__file__).resolve().parent / "script_timer.py"
    tokenizers = tokenizer_cache(setup, output_dir.parent)
    return [str(python()), str(timer), str(script_path(method))] + script_args(
        method, setup, steps, seed, output_dir, tokenizers)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description="kohya's sd-scripts for the benchmark")
    sub = parser.add_subparsers(dest="action", required=True)
    setup = sub.add_parser("setup", help="write the checkout and its environment")
    setup.add_argument("--git-dir", required=True)
    setup.add_argument("--rev", default=REV)
    sub.add_parser("where", help="print where the checkout and environment are")
    args = parser.parse_args(argv)
    if args.action == "setup":
        info = write_checkout(Path(args.git_dir), checkout_dir(), args.rev)
        make_venv(checkout_dir())
        print(json.dumps(info, indent=1))
    else:
        print(checkout_dir(), python(), json.dumps(source_info(), indent=1))


if __name__ == "__main__":
    main()
