"""Tests of pd_runtime.scheduling: plugins, profiles, the P/D decider, the KV-aware scheduler."""
