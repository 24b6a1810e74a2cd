"""Tests of pd_runtime.kv_events."""
