"""Running `divico` in the test process, as its console script does."""

from __future__ import annotations

import pytest

from pipeline.cli import main as divico


def run_divico(args: list[str]) -> int:
    """The exit status of `divico ARGS` (what it logs goes to caplog, what it prints to capsys)."""
    with pytest.raises(SystemExit) as exit_:
        divico(args)
    return exit_.value.code
