"""bitnet.pyi describes the module as it is: mypy's stubtest compares every class, function,
argument and default of the stub with the installed module."""

import subprocess
import sys

import pytest


def test_the_stub_matches_the_module(tmp_path):
    pytest.importorskip("mypy", reason="mypy (for stubtest) is not installed")
    # maturin's wrapper package holds the extension as bitnet.bitnet, which has no stub of its own.
    allow = tmp_path / "allowlist.txt"
    allow.write_text("bitnet.bitnet\n")
    out = subprocess.run(
        [sys.executable, "-m", "mypy.stubtest", "bitnet", "--allowlist", str(allow)],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert out.returncode == 0, out.stdout + out.stderr
