"""Stores: pick one from COSIGNER_DATABASE."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from gateway.store.base import Store
from gateway.store.sqlite import SqliteStore


def store_from_url(url: str, *, clock: Callable[[], float] | None = None) -> Store:
    """``sqlite:///path`` (embedded default) or ``postgresql://...``."""
    if url.startswith("sqlite:///"):
        return SqliteStore.from_url(url, clock=clock)
    if url.startswith(("postgresql://", "postgres://")):
        from gateway.store.postgres import PostgresStore  # asyncpg only when it is used

        return PostgresStore.from_url(url, clock=clock)
    # SECURITY: only the scheme is repeated: the rest of the URL may hold a password.
    scheme = url.partition("://")[0] + "://" if "://" in url else "a value without a scheme"
    raise ValueError(f"COSIGNER_DATABASE must start with sqlite:/// or postgresql://, not {scheme}")


def existing_store(url: str) -> Store:
    """The store at ``url`` for an operator command: a missing SQLite file is an error.

    Opening a SQLite URL that names no file would create an empty database, which for a
    CLI run in the wrong folder is almost certainly not what was meant.
    """
    if url.startswith("sqlite:///"):
        path = Path(url.removeprefix("sqlite:///")).expanduser()
        if not path.exists():
            raise ValueError(
                f"no database at {path.resolve()}; run this where `cosigner serve` runs, "
                "or set COSIGNER_DATABASE"
            )
    return store_from_url(url)
