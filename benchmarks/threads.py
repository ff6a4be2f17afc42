"""What torch's intra-op threads do to `tbptt train`: 1 against 2 threads, on a quiet machine and
under a competing load, in process CPU seconds and wall seconds.

Each run is `tbptt train` (through `tbptt.cli.main`) in a fresh Python process, timed around the
command alone (imports not counted); the arms are interleaved (the order of the thread counts
alternates from repeat to repeat) and every repeat runs each workload quiet, then loaded. The load
is a number of busy-looping Python processes started by this script and ended by it afterwards.
A run that outlasts --timeout wall seconds is ended and kept as a lower bound. Run:
    python benchmarks/threads.py [--repeats 5] [--load 2] [--out benchmarks/results/threads-cpu.md]
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import io
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# (name, `tbptt train` arguments): the command's defaults (echo, LSTM of 32 units, 16 streams of
# 200 steps, 10 epochs), and a bigger model on more streams (3 epochs: about as long on one thread)
WORKLOADS = {
    "default (echo, lstm hidden 32, B 16, 10 epochs)": ["--task", "echo", "--config", "10,20"],
    "big (echo, lstm hidden 256, B 32, 3 epochs)": ["--task", "echo", "--config", "10,20", "--epochs", "3",
                                                    "--hidden", "256", "--task-option", "batch_size=32"],
}
COMMAND = "python benchmarks/threads.py"


def child(argv: list[str]) -> None:
    """Run `tbptt train ARGV` here and print its process CPU and wall seconds and last loss as JSON."""
    from tbptt.cli import main

    with tempfile.TemporaryDirectory() as folder:
        log = Path(folder) / "log.jsonl"
        # where the command starts, for a run the parent ends at its time limit
        print(json.dumps({"started_cpu": time.process_time(), "started_at": time.time()}), flush=True)
        cpu, wall = time.process_time(), time.perf_counter()
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            code = main(["train", *argv, "--log", str(log)])
        cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
        last = json.loads(log.read_text().splitlines()[-1])
    print(json.dumps({"code": code, "cpu": cpu, "wall": wall, "train_loss": last["train_loss"]}))


def _cpu_seconds(pid: int) -> float:
    """The CPU seconds (user + system) process ``pid`` has used so far, from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def measure(argv: list[str], threads: int, timeout: float) -> dict:
    """One run; one whose command outlasts ``timeout`` wall seconds is ended and kept as a lower
    bound (``censored``): the command's wall and CPU seconds so far."""
    load = os.getloadavg()[0]
    child_process = subprocess.Popen([sys.executable, __file__, "--child", "--", *argv, "--threads", str(threads)],
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    start = json.loads(child_process.stdout.readline())  # the imports are done: the command starts
    try:
        out, err = child_process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        cpu = _cpu_seconds(child_process.pid) - start["started_cpu"]
        wall = time.time() - start["started_at"]
        child_process.kill()
        child_process.communicate()
        return {"cpu": cpu, "wall": wall, "train_loss": math.nan, "censored": True, "load": load}
    if child_process.returncode != 0:
        raise RuntimeError(f"tbptt train {' '.join(argv)} failed: {err}")
    result = json.loads(out.strip().splitlines()[-1])
    if result["code"] != 0:
        raise RuntimeError(f"tbptt train {' '.join(argv)} exited {result['code']}: {err}")
    return {**result, "censored": False, "load": load}


@contextlib.contextmanager
def competing_load(processes: int):
    """``processes`` busy loops for the duration of the block, each ended by its own id."""
    spinners = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(processes)]
    try:
        time.sleep(0.5)  # let them reach the scheduler before the run starts
        yield
    finally:
        for spinner in spinners:
            spinner.kill()
        for spinner in spinners:
            spinner.wait()


def spread(values: list[float], censored: bool) -> str:
    """min / median / max; ">=" on the median and max when a run was ended at the time limit (its
    time is a lower bound, and so are they)."""
    bound = ">=" if censored else ""
    return f"{min(values):.2f} / {bound}{statistics.median(values):.2f} / {bound}{max(values):.2f}"


def ratio(more: list[float], one: list[float], censored: bool) -> str:
    """The median over the reference's median, with the range of the per-repeat ratios."""
    per_repeat = [m / o for m, o in zip(more, one)]
    bound = ">=" if censored else ""
    return (f"{bound}{statistics.median(more) / statistics.median(one):.2f} "
            f"({min(per_repeat):.2f}-{bound}{max(per_repeat):.2f})")


def table(results: dict, thread_counts: list[int], args: argparse.Namespace) -> str:
    base = thread_counts[0]
    lines = [
        f"# Threads: `tbptt train` with {' vs '.join(map(str, thread_counts))} torch threads",
        "",
        f"Run {datetime.date.today().isoformat()} with `{COMMAND} --repeats {args.repeats} --load {args.load} "
        f"--timeout {args.timeout:g}` on {platform.machine()}, {platform.platform()}, {os.cpu_count()} CPUs, "
        f"torch {args.torch}. Quiet: the machine as it is (shared: other jobs may run; the load average at the "
        f"start of each run is in the table); loaded: {args.load} busy-looping Python processes beside the run. "
        "Each run is `tbptt train ... --threads N` in a fresh process, timed around the command (imports not "
        f"counted), in process CPU seconds (all threads) and wall seconds; the thread counts are interleaved, "
        f"{args.repeats} repeats. Times as min / median / max; ratio: the median over the median at {base} "
        f"thread (in brackets: the range of the per-repeat ratios). A command still going after {args.timeout:g} "
        "wall seconds was ended: its times so far are lower bounds, and so are the medians, maxima and ratios "
        "they enter (marked >=).",
        "",
        "| workload | machine | load avg | threads | CPU s | wall s | CPU ratio | wall ratio | runs ended | "
        "last train loss |",
        "|---|---|---|---:|---|---|---:|---:|---:|---|",
    ]
    for (name, condition), arms in results.items():
        one = arms[base]
        for threads in thread_counts:
            runs = arms[threads]
            cpu, wall = [r["cpu"] for r in runs], [r["wall"] for r in runs]
            ended = sum(r["censored"] for r in runs)
            bound = ended > 0 or any(r["censored"] for r in one)
            loads = [r["load"] for r in runs]
            same = threads == base
            losses = sorted({f"{r['train_loss']:.4g}" for r in runs if not r["censored"]})
            lines.append(
                f"| {name} | {condition} | {min(loads):.1f}-{max(loads):.1f} | {threads} | {spread(cpu, ended > 0)} | "
                f"{spread(wall, ended > 0)} | {'1' if same else ratio(cpu, [r['cpu'] for r in one], bound)} | "
                f"{'1' if same else ratio(wall, [r['wall'] for r in one], bound)} | {ended} | "
                f"{', '.join(losses) or '-'} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", default="1,2", help="thread counts compared, the first the reference")
    parser.add_argument("--load", type=int, default=2, help="busy-looping processes of the loaded runs")
    parser.add_argument("--timeout", type=float, default=120.0, help="wall seconds after which a run is ended")
    parser.add_argument("--workload", action="append", choices=tuple(WORKLOADS), help="(default: all)")
    parser.add_argument("--out", type=Path, default=None, help="also write the table here (markdown)")
    args = parser.parse_args()
    import torch

    from tbptt.files import atomic_write_text

    args.torch = torch.__version__
    thread_counts = [int(v) for v in args.threads.split(",")]
    names = args.workload or list(WORKLOADS)
    results: dict = {(name, condition): {t: [] for t in thread_counts}
                     for name in names for condition in ("quiet", "loaded")}
    for repeat in range(args.repeats):
        order = thread_counts if repeat % 2 == 0 else thread_counts[::-1]
        for condition in ("quiet", "loaded"):
            with competing_load(args.load if condition == "loaded" else 0):
                for name in names:
                    for threads in order:
                        run = measure(WORKLOADS[name], threads, args.timeout)
                        results[(name, condition)][threads].append(run)
                        print(f"repeat {repeat + 1}, {name}, {condition}, {threads} thread(s): "
                              f"{run['cpu']:.2f} CPU s, {run['wall']:.2f} s{' (ended)' if run['censored'] else ''}, "
                              f"load {run['load']:.2f}", file=sys.stderr, flush=True)
    text = table(results, thread_counts, args)
    sys.stdout.write(text)
    if args.out is not None:
        atomic_write_text(args.out, text)
        print(f"wrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        child(sys.argv[3:] if sys.argv[2:3] == ["--"] else sys.argv[2:])
    else:
        main()
