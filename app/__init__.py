"""kimi-pool: an OpenAI-compatible gateway in front of a pool of Kimi accounts."""

__version__ = "0.1.0"
