"""The coordinator: the OpenAI-compatible front door that routes each request."""
