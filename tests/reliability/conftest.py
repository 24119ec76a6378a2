"""Reliability and security suite (issue 7): the `soak` marker and the figures report.

Fast tests run in CI; long ones carry `@pytest.mark.soak` and only run with CAPI_SOAK=1
(`make soak`). Tests report their figures (calls sent, kills survived, duplicates seen...)
through the `figures` fixture; they are printed at the end of the run and, when
CAPI_SOAK_FIGURES names a file, written there as JSON.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

_FIGURES: dict[str, dict[str, Any]] = {}


def soak_enabled() -> bool:
    return os.environ.get("CAPI_SOAK") == "1"


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "soak: long-running")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if soak_enabled():
        return
    skip = pytest.mark.skip(reason="soak test: set CAPI_SOAK=1 (make soak)")
    for item in items:
        if item.get_closest_marker("soak") is not None:
            item.add_marker(skip)


class Figures:
    """Named numbers a test reports, keyed by the test's node id."""

    def __init__(self, node_id: str) -> None:
        self._entry = _FIGURES.setdefault(node_id, {})

    def record(self, **values: Any) -> None:
        self._entry.update(values)
        print(f"figures: {json.dumps(values, default=str)}")


@pytest.fixture
def figures(request: pytest.FixtureRequest) -> Figures:
    return Figures(request.node.nodeid)


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if not _FIGURES:
        return
    terminalreporter.section("reliability figures")
    for node_id, values in _FIGURES.items():
        if values:
            terminalreporter.write_line(f"{node_id}: {json.dumps(values, default=str)}")
    target = os.environ.get("CAPI_SOAK_FIGURES")
    if target:
        Path(target).write_text(json.dumps(_FIGURES, indent=2, default=str), encoding="utf-8")
