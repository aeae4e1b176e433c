"""palm.cli: one table of commands, and one mapping from failures to exit codes shared by all
of them (0 done, 1 runtime failure, 2 bad command line or config, 130 interrupted)."""

from __future__ import annotations

import importlib
import subprocess
import sys
from pathlib import Path

import pytest

from palm import cli
from palm.errors import CheckpointError, ConfigError, DataError, PalmError, TrainingError

ROOT = Path(__file__).resolve().parents[1]


def fail(error: BaseException):
    def job():
        raise error

    return job


@pytest.mark.parametrize(
    ("error", "code"),
    [
        (ConfigError("optim.lr must be > 0"), 2),
        (DataError("data/x/meta.json: not found; run download.py"), 1),
        (CheckpointError("runs/x: no complete checkpoint"), 1),
        (TrainingError("loss spiked again"), 1),
        (PalmError("anything else"), 1),
        (KeyboardInterrupt(), 130),
    ],
)
def test_failures_become_one_error_line_and_the_shared_exit_code(error, code, capsys):
    assert cli.run(fail(error)) == code
    err = capsys.readouterr().err.strip().splitlines()
    if code == 130:
        assert err == ["interrupted"]
    else:
        assert err == [f"error: {error}"]


def test_success_and_unexpected_errors():
    assert cli.run(lambda: None) == 0
    assert cli.run(lambda: 0) == 0
    with pytest.raises(ZeroDivisionError):  # a bug is not dressed up as a user error
        cli.run(lambda: 1 / 0)


def test_every_subcommand_is_a_module_with_main():
    for name, (module, help_) in cli.SUBCOMMANDS.items():
        assert module == f"palm.cli.{name}" and help_
        assert callable(importlib.import_module(module).main)


def test_dispatch(capsys):
    assert cli.main([]) == 0 and "commands:" in capsys.readouterr().out
    assert cli.main(["frobnicate"]) == 2
    assert "unknown command 'frobnicate'" in capsys.readouterr().err


def test_download_starts_without_torch():
    """download.py --help and the data pipeline never import torch (it costs seconds)."""
    probe = (
        "import sys; from palm.cli.download import build_parser; build_parser(); "
        "import palm.data.pipeline; print('torch' in sys.modules)"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"
