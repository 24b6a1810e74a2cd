"""Filters: drop endpoints that must not serve a request (one module per filter)."""
