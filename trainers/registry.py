"""Method name -> its config class and run function, through the catalog (trainers/catalog.py);
the run is imported lazily so the page stays torch-free."""
from __future__ import annotations

from trainers import catalog


def config_class(method: str):
    return catalog.get(method).config


def runner(method: str):
    return catalog.get(method).runner()


def run_config(ctx, method: str, config: dict):
    """A training job's work, in the app's training worker process (or on its thread): the
    method's run() with the config rebuilt from its plain form."""
    from core.config import from_dict
    return runner(method)(from_dict(config_class(method), config).validate(), ctx)
