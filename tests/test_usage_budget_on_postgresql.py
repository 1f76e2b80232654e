"""test_usage_budget.py again, its gateways on PostgreSQL (tests/conftest.py on_postgresql)."""

from pathlib import Path

import pytest
from conftest import database_url
from test_usage_budget import *  # noqa: F403

# slow: `make test-quick` stays on SQLite, as the Makefile says.
pytestmark = [pytest.mark.usefixtures("on_postgresql"), pytest.mark.slow]


def test_the_gateways_of_this_module_use_postgresql(tmp_path: Path) -> None:
    assert database_url(tmp_path).startswith("postgresql")
