"""Preprocess images: crop, resize, split, flip and caption a folder of images into a dataset.

    from preprocess import PreprocessConfig, run
    summary = run(PreprocessConfig(source="raw", destination="dataset", flip=True), ctx)

The same `run` serves the Gradio tab (through core.jobs) and `python -m preprocess`."""
from preprocess.config import PreprocessConfig
from preprocess.pipeline import Summary, run

__all__ = ["PreprocessConfig", "Summary", "run"]
