"""erpd-hub's Python client: `from erpd_hub.client import ApiClient` (no torch needed)."""
