"""Running ``edgeq`` in the test process: one helper for every CLI test file."""
from __future__ import annotations

import pytest

from edgeq.cli import main


def run_cli(capsys: pytest.CaptureFixture, *argv: str) -> tuple[int, str, str]:
    """``edgeq ARGV`` here: (exit code, stdout, stderr)."""
    try:
        main(list(argv))
        code = 0
    except SystemExit as exit:
        code = 0 if exit.code is None else exit.code if isinstance(exit.code, int) else 1
    out, err = capsys.readouterr()
    return code, out, err
