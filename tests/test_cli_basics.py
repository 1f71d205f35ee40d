"""The CLI's entry points: --help, --version, list ops."""

from typer.testing import CliRunner

import drbench
from drbench.cli import app

runner = CliRunner()


def test_help_explains_the_tool():
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    assert "region-aware" in result.output


def test_version():
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0
    assert result.output.strip() == f"drbench {drbench.__version__}"


def test_list_ops_shows_every_registered_operator():
    result = runner.invoke(app, ["list", "ops"])
    assert result.exit_code == 0
    for name in ("conv", "drconv", "condconv", "local"):
        assert name in result.output
