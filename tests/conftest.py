"""Fixtures every test folder may use."""
from default_server import fp32_default_server  # noqa: F401  (a fixture, found by name)
from redis_fixture import redis_server  # noqa: F401  (a fixture, found by name)
