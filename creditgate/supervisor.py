"""``creditgate serve --workers N``: N worker processes sharing one port.

Each worker is a full ``creditgate serve`` process binding the port with
SO_REUSEPORT, so the kernel spreads connections across them. This parent
only supervises: it restarts a worker that dies, forwards SIGTERM/SIGINT for
a graceful stop, and gives every worker one Prometheus multiprocess directory
so a scrape of any worker reports the sum over all of them.

On a stop it waits for every worker's drain (``webkit.drain``: the cut at
``shutdown_timeout_seconds``, then at most ``SHUTDOWN_MARGIN_SECONDS`` to settle
and exit) before it kills anything; a kill is the last resort, and the exit
code is 0 only when every worker drained and exited 0.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from types import FrameType

from creditgate.logs import log
from creditgate.webkit.drain import SHUTDOWN_MARGIN_SECONDS

POLL_INTERVAL = 0.1  # seconds between looks at the workers
# A worker that dies after running a while is replaced at once; one that dies
# within STABLE_SECONDS of its start waits RESTART_DELAY first: no hot crash loop.
RESTART_DELAY = 1.0
STABLE_SECONDS = 10.0


def _spawn(host: str, port: int, env: dict[str, str]) -> subprocess.Popen[bytes]:
    cmd = [sys.executable, "-m", "creditgate", "serve", "--workers", "1"]
    cmd += ["--host", host, "--port", str(port)]
    return subprocess.Popen(cmd, env=env)  # noqa: S603 (our own interpreter and args)


def supervise(workers: int, host: str, port: int, shutdown_timeout: float) -> int:
    """Run ``workers`` workers until SIGTERM/SIGINT; return the exit code (0 on a clean stop)."""
    assert workers >= 2, workers
    from prometheus_client import multiprocess

    own_dir = "PROMETHEUS_MULTIPROC_DIR" not in os.environ
    metrics_dir = os.environ.get("PROMETHEUS_MULTIPROC_DIR") or tempfile.mkdtemp(
        prefix="creditgate-metrics-"
    )
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": metrics_dir}
    stopping = False

    def on_signal(signum: int, frame: FrameType | None) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)

    procs = [_spawn(host, port, env) for _ in range(workers)]
    born = [time.monotonic()] * workers
    log.info("workers started", extra={"workers": workers, "pids": [p.pid for p in procs]})
    try:
        while not stopping:
            time.sleep(POLL_INTERVAL)
            for i, proc in enumerate(procs):
                code = proc.poll()
                if code is None or stopping:
                    continue
                log.error("worker died; restarting it", extra={"pid": proc.pid, "exit_code": code})
                multiprocess.mark_process_dead(proc.pid, metrics_dir)  # type: ignore[no-untyped-call]
                if time.monotonic() - born[i] < STABLE_SECONDS:
                    time.sleep(RESTART_DELAY)
                procs[i] = _spawn(host, port, env)
                born[i] = time.monotonic()
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        killed = _wait_for_drain(procs, shutdown_timeout + SHUTDOWN_MARGIN_SECONDS)
        if own_dir:
            shutil.rmtree(metrics_dir, ignore_errors=True)
    # -SIGTERM: a worker still importing when the stop came (no handler yet, nothing in flight).
    failed = [p.pid for p in procs if p.returncode not in (0, -signal.SIGTERM)]
    if failed:
        log.error("workers did not drain cleanly", extra={"pids": failed, "killed": killed})
        return 1
    log.info("stopped")
    return 0


def _wait_for_drain(procs: list[subprocess.Popen[bytes]], seconds: float) -> list[int]:
    """Wait up to ``seconds`` for every worker to exit, then kill the rest; their pids."""
    deadline = time.monotonic() + seconds
    killed = []
    for proc in procs:
        try:
            proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            # Past its drain and margin: its holds are left to the sweeper.
            log.error("worker did not drain in time; killing it", extra={"pid": proc.pid})
            proc.kill()
            proc.wait()
            killed.append(proc.pid)
    return killed
