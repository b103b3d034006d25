"""Where a tune study lives: None (in memory), a SQLite file, or any SQLAlchemy URL Optuna accepts (a
PostgreSQL server shared by many workers). Database storages keep a heartbeat, so a trial whose worker died
is marked failed and skipped; workers starting together on an empty database may race to create Optuna's
schema, and the loser retries."""
from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import optuna

from ..errors import OptionError

HEARTBEAT_S = 60


def open_storage(storage: str | os.PathLike | None) -> Any:
    """None (in memory), a SQLite file path, or a SQLAlchemy URL (with a heartbeat, so dead workers' trials fail)."""
    if storage is None:
        return None
    url = str(storage)
    if "://" not in url:
        path = Path(url).resolve()
        path.parent.mkdir(parents=True, exist_ok=True)
        url = f"sqlite:///{path}"
    for attempt in range(1, SCHEMA_RACE_ATTEMPTS + 1):
        try:
            return optuna.storages.RDBStorage(url, heartbeat_interval=HEARTBEAT_S, grace_period=2 * HEARTBEAT_S)
        except Exception as exc:  # SQLAlchemy's errors: a missing driver, a refused connection, a bad URL
            if _lost_schema_race(exc) and attempt < SCHEMA_RACE_ATTEMPTS:
                time.sleep(attempt)
                continue
            raise OptionError(f"storage {_hide_password(url)}: {type(exc).__name__}: "
                              f"{str(exc).splitlines()[0]}") from exc


SCHEMA_RACE_ATTEMPTS = 4
# SQLSTATEs of a CREATE that lost to another worker's: unique_violation, duplicate_object (an enum type such
# as Optuna's studydirection), duplicate_table
_DUPLICATE_SQLSTATES = {"23505", "42710", "42P07"}


def _lost_schema_race(exc: Exception) -> bool:
    """Workers starting together on an empty database race to create Optuna's tables and types: the loser's
    CREATE fails on the winner's, and the schema is there once the winner commits, so the loser retries."""
    cause = getattr(exc, "orig", None)
    return getattr(cause, "pgcode", None) in _DUPLICATE_SQLSTATES or "already exists" in str(exc)


def _hide_password(url: str) -> str:
    head, at, tail = url.rpartition("@")
    if not at or ":" not in head.split("://", 1)[-1]:
        return url
    scheme, _, credentials = head.partition("://")
    return f"{scheme}://{credentials.split(':')[0]}:***@{tail}"
