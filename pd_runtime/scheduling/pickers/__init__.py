"""Pickers: choose one endpoint from the weighted scores (one module per picker)."""
