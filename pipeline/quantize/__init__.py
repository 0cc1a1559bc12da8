"""Quantized weight layouts."""
