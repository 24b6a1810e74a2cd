"""Locally generated models: no downloads, deterministic weights and tokenizer."""
