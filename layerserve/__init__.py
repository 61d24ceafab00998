"""layerserve: an OpenAI-compatible LLM server on a stateful paged-KV inference engine."""

__version__ = "0.1.0"
