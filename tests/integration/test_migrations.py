"""Migrations: ordered, recorded, idempotent, safe from two processes at once."""

from __future__ import annotations

import pytest

from queue_processor.db import Database
from queue_processor.errors import ConfigurationError
from queue_processor.migrations import check_schema, latest_version, migrate

pytestmark = pytest.mark.anyio


async def test_migrate_applies_all_then_nothing(empty_dsn: str) -> None:
    async with Database(empty_dsn) as db:
        with pytest.raises(ConfigurationError, match="queue-processor migrate"):
            await check_schema(db)
        first = await migrate(db)
        assert first == list(range(1, latest_version() + 1))
        assert await migrate(db) == []
        await check_schema(db)
