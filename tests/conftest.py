"""Fixtures every test folder may use."""
from redis_fixture import redis_server  # noqa: F401  (a fixture, found by name)
