"""pd-runtime: disaggregated prefill/decode serving for vLLM.

Processes and what travels between them are mapped in docs/structures.md.
"""

from __future__ import annotations

__all__ = ["__version__"]

__version__ = "0.1.0"
