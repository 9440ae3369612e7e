"""Shared tensor ops for guidance methods: per-sample projection and rescaling, with fused CUDA paths."""

from .projection import combine, project, rescale_to_max_norm, sample_dots

__all__ = ["combine", "project", "rescale_to_max_norm", "sample_dots"]
