"""Pytest fixtures for the corpus (see tests/conftest.py)."""
