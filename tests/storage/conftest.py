"""Shared fixtures of the storage tests: ``new_archive`` is in tests/conftest.py."""
