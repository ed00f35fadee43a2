"""dtm_ray: how far can each part of an LLM be compressed, measured with Divergent Token Metrics."""

__version__ = "0.1.0"
