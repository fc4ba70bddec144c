"""Method name -> (config class, run function), imported lazily so the page stays torch-free."""
from __future__ import annotations

import importlib

from trainers.configs import METHOD_CONFIGS

RUNNERS = {"textual_inversion": "trainers.methods.textual_inversion",
           "apt": "trainers.methods.apt",
           "xti": "trainers.methods.xti",
           "hypernetwork": "trainers.methods.hypernetwork",
           "lora": "trainers.methods.lora",
           "dreambooth": "trainers.methods.dreambooth",
           "fine_tune": "trainers.methods.fine_tune",
           "extract_lora": "trainers.extract_lora"}


def config_class(method: str):
    if method not in METHOD_CONFIGS:
        raise KeyError(f"unknown method {method!r}; known: {', '.join(METHOD_CONFIGS)}")
    return METHOD_CONFIGS[method]


def runner(method: str):
    config_class(method)
    return importlib.import_module(RUNNERS[method]).run


TITLES = {"textual_inversion": "textual inversion", "apt": "apt", "xti": "xti", "hypernetwork": "hypernetwork",
          "lora": "lora", "dreambooth": "dreambooth", "fine_tune": "fine-tune", "extract_lora": "extract lora"}
TARGETS = {"textual_inversion": "embedding", "apt": "embedding", "hypernetwork": "hypernetwork"}


def run_config(ctx, method: str, config: dict):
    """A training job's work, in the app's training worker process (or on its thread): the
    method's run() with the config rebuilt from its plain form."""
    from core.config import from_dict
    return runner(method)(from_dict(config_class(method), config).validate(), ctx)
