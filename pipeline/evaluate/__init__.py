"""Evaluation: summarization ROUGE and perplexity of an engine, optionally against transformers on the same model."""
