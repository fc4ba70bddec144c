"""The baseline: diffusers' own example training scripts, run unchanged at Danlu's settings.

The scripts are never vendored. They come from a checkout of the diffusers release that matches
the installed version, found (in this order) through
  $DANLU_DIFFUSERS_EXAMPLES   a folder holding the scripts (flat, or diffusers' examples/ tree)
  ~/.cache/danlu-bench/diffusers-examples   (or $DANLU_BENCH_CACHE/diffusers-examples)
and put into that cache folder from a git clone of diffusers with

    python -m bench.baselines extract --git-dir /path/to/diffusers/.git [--rev v0.42.1]

which takes the tag `v<installed version>`, else the newest release tag not newer than it, and
records which in SOURCE.json next to the scripts.

Each script runs in its own process under `bench/script_timer.py`, with a stand-in
`torchvision` (bench/torchvision_standin.py, written to a temp folder on PYTHONPATH) because no
torchvision build exists for the installed CPU torch.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
from pathlib import Path

from bench import fixtures

SCRIPTS = {"textual_inversion": "textual_inversion/textual_inversion.py",
           "lora": "dreambooth/train_dreambooth_lora.py",
           "lora_cached": "dreambooth/train_dreambooth_lora.py",  # + --pre_compute_text_embeddings
           "dreambooth": "dreambooth/train_dreambooth.py",
           "lora_flux": "dreambooth/train_dreambooth_lora_flux.py"}
LEARNING_RATES = {"textual_inversion": 5e-3, "lora": 1e-4, "lora_cached": 1e-4, "dreambooth": 5e-6,
                  "lora_flux": 1e-4}
LORA_RANK = 4
NEVER = "1000000"  # checkpoint/save intervals that never trigger in a benchmark run


class BaselineMissing(RuntimeError):
    pass


def examples_dir() -> Path:
    env = os.environ.get("DANLU_DIFFUSERS_EXAMPLES")
    return Path(env) if env else fixtures.bench_cache() / "diffusers-examples"


def script_path(method: str, folder: Path | None = None) -> Path:
    """The example script for `method`, flat in the folder or in diffusers' examples/ layout."""
    if method not in SCRIPTS:
        raise BaselineMissing(f"diffusers has no example script for {method}")
    folder = folder or examples_dir()
    relative = SCRIPTS[method]
    for candidate in (folder / Path(relative).name, folder / relative,
                      folder / "examples" / relative):
        if candidate.is_file():
            return candidate
    raise BaselineMissing(
        f"{Path(relative).name} not found in {folder}; set DANLU_DIFFUSERS_EXAMPLES or run "
        "`python -m bench.baselines extract --git-dir <diffusers clone>/.git`")


def source_info(folder: Path | None = None) -> dict:
    folder = folder or examples_dir()
    try:
        return json.loads((folder / "SOURCE.json").read_text())
    except (OSError, ValueError):
        return {"rev": "unknown", "note": f"scripts found in {folder}, origin not recorded"}


# ---------------------------------------------------------------- extraction from a git clone

def _version_key(tag: str) -> tuple:
    return tuple(int(x) for x in re.findall(r"\d+", tag)[:3])


def choose_rev(git_dir: Path, installed: str) -> tuple[str, str]:
    """(rev, note): the tag of the installed release, else the newest tag not newer."""
    tags = subprocess.run(["git", "--git-dir", str(git_dir), "tag", "--list", "v*"],
                          capture_output=True, text=True, check=True).stdout.split()
    releases = [t for t in tags if re.fullmatch(r"v\d+\.\d+\.\d+", t)]
    wanted = f"v{installed}"
    if wanted in releases:
        return wanted, f"tag {wanted} matches the installed diffusers {installed}"
    older = sorted((t for t in releases if _version_key(t) <= _version_key(wanted)), key=_version_key)
    if not older:
        raise BaselineMissing(f"no release tag at or below {wanted} in {git_dir}")
    return older[-1], (f"the clone has no tag {wanted} (newest release tag: "
                       f"{max(releases, key=_version_key)}); used {older[-1]}, the newest release "
                       f"not newer than the installed diffusers {installed}")


def extract(git_dir: Path, target: Path, rev: str | None = None) -> dict:
    import diffusers
    installed = diffusers.__version__
    if rev:
        note = f"rev {rev} chosen by hand; installed diffusers {installed}"
    else:
        rev, note = choose_rev(git_dir, installed)
    commit = subprocess.run(["git", "--git-dir", str(git_dir), "rev-parse", f"{rev}^{{commit}}"],
                            capture_output=True, text=True, check=True).stdout.strip()
    target.mkdir(parents=True, exist_ok=True)
    for relative in sorted(set(SCRIPTS.values())):
        text = subprocess.run(["git", "--git-dir", str(git_dir), "show",
                               f"{commit}:examples/{relative}"],
                              capture_output=True, text=True, check=True).stdout
        (target / Path(relative).name).write_text(text, encoding="utf-8")
    info = {"rev": rev, "commit": commit, "installed_diffusers": installed, "note": note,
            "scripts": {m: f"examples/{r}" for m, r in SCRIPTS.items()}}
    (target / "SOURCE.json").write_text(json.dumps(info, indent=1))
    return info


# ---------------------------------------------------------------- commands

def script_args(method: str, setup: dict, steps: int, seed: int, output_dir: Path) -> list[str]:
    """The script's arguments at the benchmark's settings (batch 1, fp32, constant LR, same
    steps/seed/resolution/rank; no validation, no checkpoints)."""
    common = ["--pretrained_model_name_or_path", setup["model"],
              "--output_dir", str(output_dir), "--resolution", str(setup["resolution"]),
              "--train_batch_size", "1", "--gradient_accumulation_steps", "1",
              "--max_train_steps", str(steps), "--learning_rate", f"{LEARNING_RATES[method]:g}",
              "--lr_scheduler", "constant", "--lr_warmup_steps", "0", "--seed", str(seed),
              "--mixed_precision", "no", "--checkpointing_steps", NEVER,
              "--dataloader_num_workers", "0"]
    images = setup["data"]["images"]
    if method == "textual_inversion":
        return common + ["--train_data_dir", images, "--learnable_property", "object",
                         "--placeholder_token", fixtures.PLACEHOLDER,
                         "--initializer_token", fixtures.INITIALIZER, "--num_vectors", "1",
                         "--save_steps", NEVER]
    dreambooth = ["--instance_data_dir", images, "--instance_prompt", fixtures.INSTANCE_PROMPT]
    if method == "lora":
        return common + dreambooth + ["--rank", str(LORA_RANK)]
    if method == "lora_cached":  # the script's own text-encoder cache (it has none for latents)
        return common + dreambooth + ["--rank", str(LORA_RANK), "--pre_compute_text_embeddings"]
    if method == "lora_flux":  # one instance prompt: the script encodes it once by itself
        return common + dreambooth + ["--rank", str(LORA_RANK), "--cache_latents",
                                      "--guidance_scale", "1", "--max_sequence_length", "512",
                                      "--weighting_scheme", "none"]
    return common + dreambooth


def command(method: str, setup: dict, steps: int, seed: int, output_dir: Path) -> list[str]:
    timer = Path(__file__).resolve().parent / "script_timer.py"
    return [sys.executable, str(timer), str(script_path(method))] + script_args(
        method, setup, steps, seed, output_dir)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description="diffusers example scripts for the benchmark")
    sub = parser.add_subparsers(dest="action", required=True)
    ex = sub.add_parser("extract", help="write the scripts from a diffusers git clone")
    ex.add_argument("--git-dir", required=True)
    ex.add_argument("--rev", help="tag or commit (default: the installed release's tag)")
    ex.add_argument("--to", default=None, help=f"target folder (default {examples_dir()})")
    sub.add_parser("where", help="print where the scripts are found")
    args = parser.parse_args(argv)
    if args.action == "extract":
        info = extract(Path(args.git_dir), Path(args.to) if args.to else examples_dir(), args.rev)
        print(json.dumps(info, indent=1))
    else:
        for method in SCRIPTS:
            try:
                print(method, script_path(method))
            except BaselineMissing as error:
                print(method, "missing:", error)
        print(json.dumps(source_info(), indent=1))


if __name__ == "__main__":
    main()
