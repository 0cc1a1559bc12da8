"""The CPU runtime: engine model, KV cache, multi-rank communication and ModelRunner."""

from pipeline.runtime.runner import ModelRunner

__all__ = ["ModelRunner"]
