"""Where creditgate's CPU goes on the hot path: a profile of the server under load.

    .venv/bin/python bench/profile_proxy.py                      # cProfile, JSON c=1, 20 s
    .venv/bin/python bench/profile_proxy.py --stream --concurrency 32
    .venv/bin/python bench/profile_proxy.py --tool py-spy        # sampling (pip install py-spy)

Same set-up as ``bench/proxy_bench.py`` (its own Postgres and Redis, the mock
and this load generator on core 1, creditgate pinned to core 0, the whole
path on), then one scenario for ``--seconds`` against creditgate alone while
it is profiled:

* ``cprofile`` runs ``creditgate serve`` with a profiler switched on by
  signal for the measured window only (not start-up), on asyncio's own event
  loop: under uvloop the loop's C code has no Python frame, so cProfile
  charges its idle waits to whichever coroutine ran last; on the stdlib loop
  they show up as ``select.epoll.poll``, which the report leaves out. The
  report is self time (tottime) grouped by package, and the top functions.
  cProfile's own cost inflates small calls, and the stdlib loop costs more
  than uvloop: read it as shares, not as absolute times.
* ``py-spy`` samples the running server (``py-spy record --format raw``):
  shares of samples by the package of the innermost frame, and the top leaf
  functions. Note: py-spy counts wall time of the thread, so time the process
  is idle waiting on Postgres or Redis shows up in the event loop's ``poll``
  (``--idle`` off: those samples are dropped).

The CPU per request (``/proc``) during the profiled run is printed too: it is
higher than without the profiler, for cProfile much higher.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import os
import pstats
import re
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parent))

import proxy_bench as pb


def package_of(filename: str) -> str:
    """A short owner for a source file: the site-packages package, creditgate's
    subpackage, the stdlib module, or ``builtins``."""
    if filename in ("~", "") or filename.startswith("<"):
        return "builtins (C)"
    m = re.search(r"site-packages/([^/]+)", filename)
    if m:
        return m.group(1).removesuffix(".py").split(".")[0]
    m = re.search(r"creditgate/(\w+)", filename)
    if m and "creditgate" in filename and "site-packages" not in filename:
        return f"creditgate.{m.group(1).removesuffix('.py')}"
    m = re.search(r"python3\.\d+/(\w+)", filename)
    if m:
        return f"stdlib {m.group(1).removesuffix('.py')}"
    return filename


# Runs `creditgate serve` on asyncio's loop with a profiler that SIGUSR1 starts
# and SIGUSR2 stops and writes to argv[1].
_PROFILED_SERVE = """
import cProfile, signal, sys
import creditgate.cli as cli
out = sys.argv.pop(1)
profile = cProfile.Profile()
def start(*_): profile.enable()
def stop(*_): profile.disable(); profile.dump_stats(out)
signal.signal(signal.SIGUSR1, start)
signal.signal(signal.SIGUSR2, stop)
cli._use_uvloop = lambda: None
sys.exit(cli.main(sys.argv[1:]))
"""
_IDLE = ("poll", "select")  # the event loop waiting: not CPU


def report_cprofile(path: Path, requests: int, top: int) -> None:
    stats = pstats.Stats(str(path))
    raw = {
        k: v
        for k, v in stats.stats.items()  # type: ignore[attr-defined]
        if not (k[0] == "~" and any(f"'{w}' of 'select." in k[2] for w in _IDLE))
    }
    by_pkg: collections.Counter[str] = collections.Counter()
    total = 0.0
    for (filename, _, _), (_, _, tottime, _, _) in raw.items():
        by_pkg[package_of(filename)] += tottime
        total += tottime
    print(f"\ncProfile: {total:.2f} s of self time over {requests} requests")
    print(f"(≈ {total / max(requests, 1) * 1000:.3f} ms per request under the profiler)\n")
    print("| package | share of self time | ms per request |\n|---|---|---|")
    for pkg, t in by_pkg.most_common(20):
        print(f"| {pkg} | {t / total:.1%} | {t / max(requests, 1) * 1000:.3f} |")
    print("\ncreditgate's own functions by cumulative time (callees included):\n")
    print("| function | calls/request | cumulative µs/request |\n|---|---|---|")
    ours = [kv for kv in raw.items() if package_of(kv[0][0]).startswith("creditgate.")]
    for (filename, line, name), (_, ncalls, _, cumtime, _) in sorted(
        ours, key=lambda kv: kv[1][3], reverse=True
    )[:top]:
        print(
            f"| {package_of(filename)}:{Path(filename).name}:{line} {name} "
            f"| {ncalls / max(requests, 1):.1f} | {cumtime / max(requests, 1) * 1e6:.1f} |"
        )
    print(f"\ntop {top} functions by self time:\n")
    print("| function | calls/request | self µs/request | share |\n|---|---|---|---|")
    ranked = sorted(raw.items(), key=lambda kv: kv[1][2], reverse=True)[:top]
    for (filename, line, name), (_, ncalls, tottime, _, _) in ranked:
        where = f"{package_of(filename)}:{Path(filename).name}:{line} {name}"
        print(
            f"| {where} | {ncalls / max(requests, 1):.1f} "
            f"| {tottime / max(requests, 1) * 1e6:.1f} | {tottime / total:.1%} |"
        )


_FRAME = re.compile(r"^(?P<func>.*?) \((?P<file>[^:()]*)(?::(?P<line>\d+))?\)$")


def report_pyspy(path: Path, top: int) -> None:
    by_pkg: collections.Counter[str] = collections.Counter()
    by_leaf: collections.Counter[str] = collections.Counter()
    total = 0
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack:
            continue
        n = int(count)
        leaf = stack.split(";")[-1]
        m = _FRAME.match(leaf)
        filename = m.group("file") if m else leaf
        func = m.group("func") if m else leaf
        by_pkg[package_of(filename)] += n
        by_leaf[f"{package_of(filename)}:{Path(filename).name} {func}"] += n
        total += n
    print(f"\npy-spy: {total} samples (innermost frame)\n")
    print("| package | share of samples |\n|---|---|")
    for pkg, n in by_pkg.most_common(20):
        print(f"| {pkg} | {n / total:.1%} |")
    print(f"\ntop {top} leaf functions:\n")
    print("| function | share |\n|---|---|")
    for name, n in by_leaf.most_common(top):
        print(f"| {name} | {n / total:.1%} |")


async def main(args: argparse.Namespace) -> None:
    with contextlib.suppress(AttributeError, OSError):
        os.sched_setaffinity(0, {pb.LOAD_CORE})
    scenario = pb.Scenario(
        f"{'stream' if args.stream else 'json'}, c={args.concurrency}",
        stream=args.stream,
        concurrency=args.concurrency,
    )
    with (
        tempfile.TemporaryDirectory(prefix="cg-prof-") as tmp,
        pb.services(Path(tmp)) as (
            pg_url,
            redis_url,
            backing,
        ),
    ):
        key = await pb.seed(pg_url)
        mock_port, cg_port = pb.free_port(), pb.free_port()
        creditgate = str(Path(sys.executable).parent / "creditgate")
        mock = subprocess.Popen(
            pb.pinned(pb.LOAD_CORE, [creditgate, "mock-upstream", "--port", str(mock_port)]),
            stderr=subprocess.DEVNULL,
        )
        upstream = f"http://127.0.0.1:{mock_port}/v1"
        config = Path(tmp) / "bench.toml"
        config.write_text(pb.CONFIG.format(upstream=upstream, model=pb.MODEL))
        env = {
            **os.environ,
            "CREDITGATE_CONFIG": str(config),
            "DATABASE_URL": pg_url,
            "REDIS_URL": redis_url,
            "LOG_LEVEL": args.log_level,
        }
        prof = Path(tmp) / "out.prof"
        serve = ["serve", "--port", str(cg_port)]
        if args.tool == "cprofile":
            argv = [sys.executable, "-c", _PROFILED_SERVE, str(prof), *serve]
        else:
            argv = [creditgate, *serve]
        cg = subprocess.Popen(pb.pinned(pb.PROXY_CORE, argv), env=env, stderr=subprocess.DEVNULL)
        spy: subprocess.Popen[bytes] | None = None
        try:
            await pb.wait_ready(f"{upstream}/models", "mock-upstream", mock)
            await pb.wait_ready(f"http://127.0.0.1:{cg_port}/health", "creditgate", cg)
            target = pb.Target(
                "creditgate",
                f"http://127.0.0.1:{cg_port}/v1/chat/completions",
                {"Authorization": f"Bearer {key}"},
                cg.pid,
            )
            async with aiohttp.ClientSession() as session:
                await pb.run_batch(session, target, scenario, 2.0, pb.Sample(), backing)
                if args.tool == "py-spy":
                    pyspy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
                    if not Path(pyspy).exists():
                        raise SystemExit("py-spy is not installed: .venv/bin/pip install py-spy")
                    spy = subprocess.Popen(
                        pb.pinned(
                            pb.LOAD_CORE,
                            [
                                pyspy, "record", "--format", "raw", "-o", str(prof),
                                "-p", str(cg.pid), "-d", str(int(args.seconds)),
                                "--rate", "250", "--nonblocking",
                            ],
                        ),
                        stdout=subprocess.DEVNULL,
                        stderr=subprocess.DEVNULL,
                    )  # fmt: skip
                    await asyncio.sleep(0.5)
                else:
                    cg.send_signal(signal.SIGUSR1)
                s = pb.Sample()
                await pb.run_batch(session, target, scenario, args.seconds, s, backing)
                if args.tool == "cprofile":
                    cg.send_signal(signal.SIGUSR2)
                    await asyncio.sleep(1.0)
            n = len(s.latency)
            cpu = s.proxy_ticks / os.sysconf("SC_CLK_TCK") / max(n, 1) * 1000
            print(
                f"{scenario.name}: {n} requests in {s.elapsed:.1f} s ({n / s.elapsed:.0f}/s),"
                f" p50 {pb.ms(pb.pct(s.latency, 0.5))} ms, creditgate CPU {cpu:.3f} ms/request"
                f" under {args.tool}, errors {s.errors}"
            )
            if spy is not None:
                spy.wait(timeout=args.seconds + 30)
        finally:
            cg.send_signal(signal.SIGINT)
            cg.wait(timeout=30)
            mock.terminate()
            mock.wait(timeout=10)
        if args.tool == "cprofile":
            report_cprofile(prof, n, args.top)
        else:
            report_pyspy(prof, args.top)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tool", choices=("cprofile", "py-spy"), default="cprofile")
    parser.add_argument("--stream", action="store_true", help="20-chunk streams (default JSON)")
    parser.add_argument("--concurrency", type=int, default=1)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--top", type=int, default=30, help="how many functions to list")
    parser.add_argument("--log-level", default="info", help="creditgate's LOG_LEVEL")
    args = parser.parse_args()
    with contextlib.suppress(ImportError):
        import uvloop

        uvloop.install()
    asyncio.run(main(args))
