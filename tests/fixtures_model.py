"""Pytest fixtures for the model (see tests/conftest.py)."""
