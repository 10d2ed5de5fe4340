"""py-spy around one phase of a benchmark: collapsed stacks per process (``bench/profile_top.py`` reads them).

    with profiled({"client": os.getpid(), "cs0": pid}, "load", out_dir):
        run_the_phase()

Nothing happens when ``out_dir`` is None. py-spy is found on PATH or next to the running interpreter
(a virtual environment's ``bin``); a missing py-spy is an error, not a silent empty profile.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager


def pyspy_binary() -> str:
    found = shutil.which("py-spy") or shutil.which("py-spy", path=os.path.dirname(sys.executable))
    if not found:
        raise SystemExit("py-spy not found: pip install py-spy (or drop --profile)")
    return found


@contextmanager
def profiled(pids: dict[str, int], phase: str, out_dir: str | None, rate: int = 250,
             native: bool = False) -> Iterator[None]:
    """Sample every process in ``pids`` while the block runs; one ``<name>-<phase>.txt`` per process.
    ``native``: C frames too (py-spy then pauses the process for each sample: slower, and it skews)."""
    if out_dir is None or not pids:
        yield
        return
    os.makedirs(out_dir, exist_ok=True)
    binary = pyspy_binary()
    spies = []
    for name, pid in pids.items():
        out = os.path.join(out_dir, f"{name}-{phase}.txt")
        cmd = [binary, "record", "--pid", str(pid), "--rate", str(rate), "--threads",
               "--format", "raw", "--output", out] + (["--native"] if native else ["--nonblocking"])
        spies.append(subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
    time.sleep(1.0)  # let py-spy attach before the phase starts
    try:
        yield
    finally:
        for spy in spies:
            spy.send_signal(signal.SIGINT)
        for spy in spies:
            try:
                spy.wait(timeout=30)
            except subprocess.TimeoutExpired:
                spy.kill()
