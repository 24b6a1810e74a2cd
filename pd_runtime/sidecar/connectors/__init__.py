"""KV-transfer protocols as the sidecar speaks them, one module each (``nixl.py``), chosen by name
from :data:`~pd_runtime.sidecar.connectors.base.CONNECTORS`."""

from __future__ import annotations

from pd_runtime.sidecar.connectors.base import CONNECTORS, Connector, Disaggregated, PrefillCall

__all__ = ["CONNECTORS", "Connector", "Disaggregated", "PrefillCall"]
