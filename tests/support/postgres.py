"""Throwaway PostgreSQL databases for tests: one fresh database per use, dropped after.

The server is the one on this machine (``COSIGNER_TEST_POSTGRES``, default
``postgresql://postgres@127.0.0.1:5432/test``). Each database gets a random
name, so parallel workers and parallel test runs never share one.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import secrets
from collections.abc import Coroutine, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar
from urllib.parse import urlsplit, urlunsplit

import asyncpg

T = TypeVar("T")
ADMIN_URL = os.environ.get("COSIGNER_TEST_POSTGRES", "postgresql://postgres@127.0.0.1:5432/test")
PREFIX = "cosigner_test_"


def _run(coro: Coroutine[Any, Any, T]) -> T:
    """Run a coroutine to completion on a private loop (callable from sync and async tests)."""
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, coro).result(60)


def url_for(database: str) -> str:
    """The server's URL with another database name."""
    parts = urlsplit(ADMIN_URL)
    return urlunsplit(parts._replace(path="/" + database))


def unavailable() -> str | None:
    """Why PostgreSQL cannot be used for tests, or None when it can."""

    async def probe() -> None:
        conn = await asyncpg.connect(ADMIN_URL, timeout=5)
        await conn.close()

    try:
        _run(probe())
    except (OSError, asyncpg.PostgresError, TimeoutError) as exc:
        host = urlsplit(ADMIN_URL).hostname
        return f"PostgreSQL at {host} unreachable ({type(exc).__name__}: {exc})"
    return None


async def _admin(sql: str) -> None:
    conn = await asyncpg.connect(ADMIN_URL, timeout=10)
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


@contextmanager
def fresh_database() -> Iterator[str]:
    """The URL of a new, empty database; dropped (connections and all) afterwards."""
    name = PREFIX + secrets.token_hex(6)
    # template0: never connected to, so concurrent CREATE DATABASEs cannot trip on it.
    _run(_admin(f"CREATE DATABASE \"{name}\" TEMPLATE template0 ENCODING 'UTF8'"))
    try:
        yield url_for(name)
    finally:
        _run(_admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
