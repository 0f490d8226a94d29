"""A stand-in for a training process that takes its time to stop: the first SIGINT/SIGTERM is
counted and honoured a second later (a step to finish, a last.pt to write: exit 0); a second
signal is counted and ends it at once (exit 9), as `sokd train` does. With no signal within 30 s
it gives up (exit 3), so a test whose signal never arrives fails instead of hanging.

    python tests/slow_to_stop.py COUNT_FILE READY_FILE
"""
import signal
import sys
import time
from pathlib import Path

count, ready = Path(sys.argv[1]), Path(sys.argv[2])


def handler(signum, frame):
    n = int(count.read_text()) + 1 if count.exists() else 1
    count.write_text(str(n))
    if n > 1:
        sys.exit(9)


for sig in (signal.SIGINT, signal.SIGTERM):
    signal.signal(sig, handler)
ready.touch()
deadline = time.monotonic() + 30
while not count.exists():
    if time.monotonic() > deadline:
        sys.exit(3)
    time.sleep(0.01)
time.sleep(1.0)
sys.exit(0)
