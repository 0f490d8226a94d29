"""`sokd models | head -3`: a reader that goes away ends the command quietly (exit 141, as a
process killed by SIGPIPE), never with a traceback or an "internal error" line."""
from __future__ import annotations

import io
import os
import subprocess
import sys

from sokd.cli import main


def test_stdout_without_a_reader_exits_141_with_nothing_on_stderr():
    read_end, write_end = os.pipe()
    os.close(read_end)  # the reader is gone before sokd writes anything: every write gets EPIPE
    try:
        proc = subprocess.run([sys.executable, "-m", "sokd", "models", "resnet8"], stdout=write_end,
                              stderr=subprocess.PIPE, env={**os.environ, "OMP_NUM_THREADS": "1"},
                              timeout=300)
    finally:
        os.close(write_end)
    assert proc.stderr.decode() == ""
    assert proc.returncode == 141


class ClosedPipe(io.StringIO):
    def write(self, text):
        raise BrokenPipeError(32, "Broken pipe")


def test_in_process_broken_pipe_is_141_not_an_internal_error(monkeypatch, capsys):
    monkeypatch.setattr(sys, "stdout", ClosedPipe())
    assert main(["models", "resnet8"]) == 141
    assert capsys.readouterr().err == ""
