"""Tests of the package metadata and the ``jstab`` command line."""

import importlib.metadata
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import jstab
from jstab import cli


def test_version_is_a_string_matching_the_package_metadata():
    assert isinstance(jstab.__version__, str)
    assert re.fullmatch(r"\d+\.\d+\.\d+([.-]?\w+)*", jstab.__version__)
    assert importlib.metadata.version("jstab") == jstab.__version__


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(args, capture_output=True, text=True, timeout=120)


def _console_script() -> str:
    """The installed ``jstab`` script: beside this interpreter, else on PATH."""
    beside = Path(sys.executable).parent / "jstab"
    found = str(beside) if beside.exists() else shutil.which("jstab")
    if found is None:
        pytest.fail(f"console script `jstab` not installed for {sys.executable}")
    return found


@pytest.mark.parametrize("how", ["python -m jstab", "console script"])
def test_version_flag_prints_the_version_and_exits_0(how):
    if how == "console script":
        command = (_console_script(),)
    else:
        command = (sys.executable, "-m", "jstab")
    result = _run(*command, "--version")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"jstab {jstab.__version__}"


def test_help_lists_usage_and_exits_0():
    result = _run(sys.executable, "-m", "jstab", "--help")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("usage: jstab")
    assert "--version" in result.stdout


def test_no_arguments_prints_help_and_exits_0(capsys):
    assert cli.main([]) == 0
    assert capsys.readouterr().out.startswith("usage: jstab")


def test_unknown_subcommand_exits_nonzero_with_a_clear_message():
    result = _run(sys.executable, "-m", "jstab", "no-such-command")
    assert result.returncode == 2
    assert "no-such-command" in result.stderr
    assert "usage: jstab" in result.stderr
