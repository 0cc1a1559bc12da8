"""trtllm-pipeline: convert -> build -> evaluate for TensorRT-LLM checkpoints, declared as Hydra recipes."""

__version__ = "0.1.0"
