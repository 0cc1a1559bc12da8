"""Fixtures borrowed from other test packages: the quantization tests' tiny Llama with a tokenizer."""

from tests.quantize.conftest import quant_model

__all__ = ["quant_model"]
