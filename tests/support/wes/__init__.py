"""Test support for the GA4GH WES adapter: a real sapporo server (sapporo_server.py) and a tiny shell workflow."""
