"""The Gradio page: one file per tab; no torch, diffusers, transformers or peft imports here."""
