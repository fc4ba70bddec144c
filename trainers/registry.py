"""Method name -> (config class, run function), imported lazily so the page stays torch-free."""
from __future__ import annotations

import importlib

from trainers.configs import METHOD_CONFIGS

RUNNERS = {"textual_inversion": "trainers.methods.textual_inversion",
           "hypernetwork": "trainers.methods.hypernetwork",
           "lora": "trainers.methods.lora",
           "dreambooth": "trainers.methods.dreambooth",
           "extract_lora": "trainers.extract_lora"}


def config_class(method: str):
    if method not in METHOD_CONFIGS:
        raise KeyError(f"unknown method {method!r}; known: {', '.join(METHOD_CONFIGS)}")
    return METHOD_CONFIGS[method]


def runner(method: str):
    config_class(method)
    return importlib.import_module(RUNNERS[method]).run
