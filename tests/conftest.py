"""Shared pytest fixtures live in one module per part of the project, registered here."""

pytest_plugins = [
    "tests.fixtures_model",
    "tests.fixtures_corpus",
]
