"""test_usage_budget.py again, its gateways on PostgreSQL (tests/conftest.py on_postgresql)."""

from pathlib import Path

import pytest
from conftest import database_url
from test_usage_budget import *  # noqa: F403

# slow: `make test-quick` stays on SQLite, as the Makefile says.
pytestmark = [pytest.mark.usefixtures("on_postgresql"), pytest.mark.slow]

# Where `gpupool usage` reads its token from is the same on any database (40 s of CLI runs).
del test_gpupool_usage_reads_the_token_from_the_environment_a_file_or_stdin  # noqa: F821


def test_the_gateways_of_this_module_use_postgresql(tmp_path: Path) -> None:
    assert database_url(tmp_path).startswith("postgresql")
