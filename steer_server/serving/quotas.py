"""Per-tenant quotas: what a tenant may store, spend on forward passes, and run at once.

- ``vectors``, ``bytes``: what the tenant references in the store (``TenantUsage``), checked
  inside the store's write that would pass them (``vector_store.base.StoreLimits``), so
  concurrent writers on any replica cannot overshoot;
- ``capture_tokens_per_minute``: the tokens a tenant's vector computations send through the
  engine (contrast prompts and pairs, charged before the capture), and the tokens its sweeps
  and calibrations generate (charged when the job starts), per fixed minute;
- ``steered_in_flight``: its steered requests being answered at once.

Over one: HTTP 429 naming the quota and its limit, with ``Retry-After`` for the rate. Only the
steering paths are counted: unsteered requests and other tenants never wait on a quota. The
counters live in the vector store (``VectorStore.charge`` / ``acquire``), so with a Redis store
every replica shares them, and with an SQLite store every API process of the host.

``--quotas-file``: one tenant a line, ``TENANT quota=N ...`` (``*`` for every tenant the file
does not name; a quota left out is unlimited); blank lines and ``#`` comment lines skipped.
"""
from __future__ import annotations

import dataclasses
import logging
import uuid
from dataclasses import dataclass
from pathlib import Path

from steer_server.config_lines import config_lines
from vector_store.async_access import AsyncStore
from vector_store.base import (
    QuotaExceeded,
    StoredDataDamaged,
    StoreLimits,
    StoreUnavailable,
    VectorStoreError,
    check_tenant,
)

logger = logging.getLogger("vllm.steer_server")
CAPTURE_WINDOW_S = 60.0
# A slot whose process died is free again after this long (a steered request's answer takes less).
IN_FLIGHT_LEASE_S = 900.0
EVERY_TENANT = "*"


class QuotaConfigError(ValueError):
    """A quotas file that cannot be used; the message names the file and line."""


@dataclass(frozen=True)
class TenantQuota:
    """One tenant's limits; None: unlimited."""

    vectors: int | None = None
    bytes: int | None = None
    capture_tokens_per_minute: int | None = None
    steered_in_flight: int | None = None

    @property
    def store_limits(self) -> StoreLimits | None:
        if self.vectors is None and self.bytes is None:
            return None
        return StoreLimits(self.vectors, self.bytes)


QUOTA_NAMES = tuple(field.name for field in dataclasses.fields(TenantQuota))


@dataclass(frozen=True)
class Quotas:
    per_tenant: dict[str, TenantQuota] = dataclasses.field(default_factory=dict)
    every_tenant: TenantQuota = TenantQuota()

    def of(self, tenant: str) -> TenantQuota:
        return self.per_tenant.get(tenant, self.every_tenant)


def read_quotas_file(path: str | Path) -> Quotas:
    per_tenant: dict[str, TenantQuota] = {}
    for where, (tenant, *settings) in config_lines(path, "quotas file", QuotaConfigError):
        if tenant != EVERY_TENANT:
            try:
                check_tenant(tenant)
            except VectorStoreError as exc:
                raise QuotaConfigError(f"{where}: {exc}") from None
        if tenant in per_tenant:
            raise QuotaConfigError(f"{where}: tenant {tenant!r} is listed twice")
        limits: dict[str, int] = {}
        for setting in settings:
            name, equals, value = setting.partition("=")
            if name not in QUOTA_NAMES or not equals:
                raise QuotaConfigError(f"{where}: expected QUOTA=N with QUOTA one of {', '.join(QUOTA_NAMES)}, "
                                       f"got {setting!r}")
            if not value.isdigit() or int(value) < 1:
                raise QuotaConfigError(f"{where}: {name} must be a whole number of at least 1, got {value!r}")
            limits[name] = int(value)
        per_tenant[tenant] = TenantQuota(**limits)
    return Quotas({t: q for t, q in per_tenant.items() if t != EVERY_TENANT},
                  per_tenant.get(EVERY_TENANT, TenantQuota()))


class QuotaKeeper:
    """The server's quotas, counted in its store."""

    def __init__(self, quotas: Quotas, store: AsyncStore):
        self.quotas = quotas
        self.store = store

    async def charge_tokens(self, tenant: str, tokens: int, what: str) -> None:
        """Count ``tokens`` of forward passes (``what``: for the message) against the tenant's
        minute; QuotaExceeded if they do not fit."""
        limit = self.quotas.of(tenant).capture_tokens_per_minute
        if limit is None or tokens <= 0:
            return
        name = "capture_tokens_per_minute"
        if tokens > limit:
            raise QuotaExceeded(name, limit, f"quota '{name}': {what} needs {tokens} tokens, more than the tenant's "
                                f"limit of {limit} a minute; make it smaller")
        wait_s = await self.store.charge(tenant, name, tokens, limit, CAPTURE_WINDOW_S)
        if wait_s is not None:
            raise QuotaExceeded(name, limit, f"quota '{name}': {what} needs {tokens} tokens and the tenant's limit "
                                f"of {limit} a minute is spent; retry in {wait_s:.0f} s", retry_after_s=wait_s)

    def concurrency(self, tenant: str, wanted: int) -> int:
        """How many steered requests a job of the tenant (a sweep, a calibration) may send at
        once: ``wanted``, within its in-flight quota."""
        limit = self.quotas.of(tenant).steered_in_flight
        return wanted if limit is None else min(wanted, limit)

    async def enter_steered(self, tenant: str) -> str | None:
        """Take one of the tenant's in-flight slots; its token for ``leave_steered`` (None: unlimited)."""
        limit = self.quotas.of(tenant).steered_in_flight
        if limit is None:
            return None
        token = uuid.uuid4().hex
        if not await self.store.acquire(tenant, "steered_in_flight", token, limit, IN_FLIGHT_LEASE_S):
            raise QuotaExceeded("steered_in_flight", limit, f"quota 'steered_in_flight': the tenant has {limit} "
                                f"steered requests being answered, its limit; retry when one finishes",
                                retry_after_s=1.0)
        return token

    async def leave_steered(self, tenant: str, token: str | None) -> None:
        """Give the slot back; one the store cannot take back now frees itself when its lease ends."""
        if token is None:
            return
        try:
            await self.store.release(tenant, "steered_in_flight", token)
        except (StoreUnavailable, StoredDataDamaged) as exc:
            logger.warning("quota: a steered request's slot of tenant %r stays taken until its lease ends "
                           "(%g s): %s", tenant, IN_FLIGHT_LEASE_S, exc)
