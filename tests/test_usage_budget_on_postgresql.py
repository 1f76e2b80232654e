"""test_usage_budget.py again, its gateways on PostgreSQL (tests/conftest.py on_postgresql)."""

from pathlib import Path

import pytest
from conftest import database_url
from test_usage_budget import *  # noqa: F403

pytestmark = pytest.mark.usefixtures("on_postgresql")


def test_the_gateways_of_this_module_use_postgresql(tmp_path: Path) -> None:
    assert database_url(tmp_path).startswith("postgresql")
