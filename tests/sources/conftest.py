"""The server fixtures of :mod:`tests.sources.fixtures` are registered in tests/conftest.py."""
