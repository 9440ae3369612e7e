"""Guidance algorithms in plain torch, one file per method; no ComfyUI import here."""
