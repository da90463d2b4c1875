"""The HTTP face: admin endpoints and (later) the OpenAI-compatible API."""
