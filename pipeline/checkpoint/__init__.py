"""The TensorRT-LLM checkpoint format: tensor layout per rank, sharding rules, streaming writer, validation."""
