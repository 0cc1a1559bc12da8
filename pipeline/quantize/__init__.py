"""Quantization: calibration statistics, the checkpoint formats of TensorRT-LLM's quantization algorithms (including
the GPU kernel layouts GPTQ weights are stored in), and the CPU engine's quantized linear layers."""
