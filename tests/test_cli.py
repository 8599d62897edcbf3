import subprocess
import sys

from rcdm.cli import STAGES, main


def test_help_lists_every_stage(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for name in STAGES:
        assert name in out


def test_unknown_stage_is_an_error():
    proc = subprocess.run([sys.executable, "-m", "rcdm", "frobnicate"], capture_output=True, text=True)
    assert proc.returncode == 2
    assert "unknown stage 'frobnicate'" in proc.stderr
