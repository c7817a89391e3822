"""Shared fixtures. The smoke pipeline is trained once per test session and reused by every test
that needs trained models or a finished run directory."""
import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import train  # noqa: E402


@pytest.fixture(scope="session")
def smoke_run(tmp_path_factory):
    """`python train.py --preset smoke` into a temporary run directory: every stage, once."""
    out = str(tmp_path_factory.mktemp("runs") / "smoke")
    assert train.main(["--preset", "smoke", "--out", out, "--quiet"]) == 0
    return out
