"""Fixtures the LoRA download tests share: a loopback server and an empty LoRA cache."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from flux_lora.lora.cache import LoraCache
from tests.fakes import FakeServer


@pytest.fixture
def fake() -> Iterator[FakeServer]:
    with FakeServer("127.0.0.1") as server:
        yield server


@pytest.fixture
def cache(tmp_path: Path) -> LoraCache:
    return LoraCache(tmp_path / "cache", max_bytes=10**9)
