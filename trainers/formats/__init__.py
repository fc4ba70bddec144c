"""Readers and writers for the files Danlu shares with A1111, ComfyUI, kohya and diffusers."""
