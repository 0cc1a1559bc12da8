"""Quantization: calibration statistics, the checkpoint formats of TensorRT-LLM's quantization algorithms, and the
CPU engine's quantized linear layers."""
