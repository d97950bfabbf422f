"""The Anthropic Messages API (Claude Code, the ``anthropic`` SDK): ``POST /v1/messages`` on the hot path,
``POST /v1/messages/count_tokens``, and ``GET /v1/models`` in Anthropic's shape."""
