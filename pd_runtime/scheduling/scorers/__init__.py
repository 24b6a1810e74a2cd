"""Scorers: rate endpoints for a request in [0, 1] (one module per scorer)."""
