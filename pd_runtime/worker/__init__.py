"""Model-server workers: vLLM's OpenAI server started with the right P/D settings."""
