"""Engines: backends that turn a TensorRT-LLM checkpoint into a runnable engine directory."""
