"""Shared helpers of the benchmarks: machine facts, interleaved timing, statistics, JSON output.

Timing discipline (the machines are shared and noisy):

- every candidate is measured in the same process as its baseline, interleaved: round i runs
  all variants once, in an order rotated by i (ABAB..., BABA...), so slow drift of the machine
  load hits every variant alike;
- each call records wall time (``time.perf_counter``) and process CPU time
  (``time.process_time``, all threads of this process; less sensitive to other processes
  taking the cores, more sensitive to OpenMP spin-waiting);
- summaries are medians; ratios are given both as the ratio of medians and as the median of
  the per-round ratios (each candidate call divided by the baseline call of the same round).

Every raw timing goes into the JSON.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

BENCH_DIR = Path(__file__).resolve().parent
RESULTS_DIR = BENCH_DIR / "results"


# --------------------------------------------------------------------------------------------
# Machine facts
# --------------------------------------------------------------------------------------------


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _mem_total_gib() -> float | None:
    try:
        import psutil

        return round(psutil.virtual_memory().total / 2**30, 2)
    except ImportError:  # pragma: no cover - psutil is present with the dev install
        return None


def available_memory_bytes() -> int | None:
    """MemAvailable of the machine (bytes), or None when unknown."""
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except ImportError:  # pragma: no cover
        return None


def _versions() -> dict[str, str]:
    versions = {"python": platform.python_version(), "torch": torch.__version__}
    for module in ("transformers", "peft", "numpy", "sadlora"):
        try:
            versions[module] = getattr(__import__(module), "__version__", "?")
        except ImportError:
            versions[module] = "absent"
    return versions


def machine_info() -> dict[str, Any]:
    """Everything needed to compare two result files: CPU, cores, threads, versions, load."""
    return {
        "platform": platform.platform(),
        "cpu_model": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "affinity_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "mem_total_gib": _mem_total_gib(),
        "torch_threads": torch.get_num_threads(),
        "torch_interop_threads": torch.get_num_interop_threads(),
        "mkldnn": torch.backends.mkldnn.is_available(),
        "mkl": torch.backends.mkl.is_available(),
        "versions": _versions(),
        "loadavg_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "argv": sys.argv,
        "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


# --------------------------------------------------------------------------------------------
# Timing
# --------------------------------------------------------------------------------------------


def timed(fn: Callable[[], Any]) -> tuple[float, float]:
    """(wall seconds, process CPU seconds) of one call of ``fn``."""
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - wall, time.process_time() - cpu


def interleaved(
    variants: Mapping[str, Callable[[], Any]], *, rounds: int, warmup: int = 1,
    progress: str | None = None,
) -> dict[str, dict[str, list[float]]]:
    """Run every variant once per round, order rotated by round; returns raw timings.

    Returns {variant: {"wall": [...], "cpu": [...]}} over the ``rounds`` timed rounds (the
    ``warmup`` rounds first are run and discarded), index i = round i for every variant.
    """
    names = list(variants)
    raw: dict[str, dict[str, list[float]]] = {n: {"wall": [], "cpu": []} for n in names}
    for index in range(warmup + rounds):
        shift = index % len(names)
        order = names[shift:] + names[:shift]
        if index % 2:  # ABAB then BABA: alternate direction as well as rotating
            order = order[::-1]
        for name in order:
            wall, cpu = timed(variants[name])
            if index >= warmup:
                raw[name]["wall"].append(wall)
                raw[name]["cpu"].append(cpu)
        if progress:
            print(f"[{progress}] round {index + 1}/{warmup + rounds} "
                  + " ".join(f"{n}={raw[n]['wall'][-1]:.4f}s" for n in names
                             if index >= warmup), file=sys.stderr, flush=True)
    return raw


def summary(values: Sequence[float]) -> dict[str, float]:
    """Median, quartiles, min, max, count of a list of timings."""
    values = sorted(values)
    if not values:
        return {"n": 0}
    quartiles = statistics.quantiles(values, n=4) if len(values) > 1 else [values[0]] * 3
    return {"median": statistics.median(values), "q1": quartiles[0], "q3": quartiles[2],
            "min": values[0], "max": values[-1], "n": len(values)}


def ratios(raw: Mapping[str, Mapping[str, list[float]]], baseline: str) -> dict[str, dict]:
    """Per variant vs ``baseline``: ratio of medians and median of per-round ratios (wall, cpu)."""
    out = {}
    for name, series in raw.items():
        if name == baseline:
            continue
        entry = {}
        for clock in ("wall", "cpu"):
            mine, base = series[clock], raw[baseline][clock]
            entry[f"{clock}_ratio_of_medians"] = statistics.median(mine) / statistics.median(base)
            paired = [m / b for m, b in zip(mine, base) if b > 0]
            entry[f"{clock}_median_paired_ratio"] = statistics.median(paired) if paired else None
        out[name] = entry
    return out


def fit_power_law(xs: Sequence[float], ys: Sequence[float]) -> dict[str, float]:
    """Least squares fit of log y = a + p log x: exponent p, prefactor e^a and R^2."""
    lx = [math.log(x) for x in xs]
    ly = [math.log(y) for y in ys]
    mx, my = statistics.fmean(lx), statistics.fmean(ly)
    sxx = sum((x - mx) ** 2 for x in lx)
    sxy = sum((x - mx) * (y - my) for x, y in zip(lx, ly))
    slope = sxy / sxx if sxx > 0 else float("nan")
    intercept = my - slope * mx
    ss_tot = sum((y - my) ** 2 for y in ly)
    ss_res = sum((y - (intercept + slope * x)) ** 2 for x, y in zip(lx, ly))
    r2 = 1.0 - ss_res / ss_tot if ss_tot > 0 else 1.0
    return {"exponent": slope, "prefactor": math.exp(intercept), "r2": r2}


def target(value: float | None, *, at_most: float | None = None,
           at_least: float | None = None, note: str = "") -> dict[str, Any]:
    """A target check record: the value, the bound and whether it is met."""
    met = None
    if value is not None and math.isfinite(value):
        met = (at_most is None or value <= at_most) and (at_least is None or value >= at_least)
    bound = f"<= {at_most}" if at_most is not None else f">= {at_least}"
    return {"value": value, "target": bound, "met": met, "note": note}


# --------------------------------------------------------------------------------------------
# Command line and output
# --------------------------------------------------------------------------------------------


def parser(name: str, description: str) -> argparse.ArgumentParser:
    """Common options: ``--size {quick,default,full}`` (``--full``/``--quick`` as shorthands),
    ``--threads``, ``--out``, ``--seed``."""
    p = argparse.ArgumentParser(prog=f"bench/{name}.py", description=description)
    p.add_argument("--size", choices=["quick", "default", "full"], default="default",
                   help="quick: smoke run (seconds, not a measurement); default: reduced sizes "
                        "that finish in minutes on 2 cores; full: the sizes of the issue")
    p.add_argument("--full", dest="size", action="store_const", const="full",
                   help="shorthand for --size full")
    p.add_argument("--quick", dest="size", action="store_const", const="quick",
                   help="shorthand for --size quick")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads (default: the CPUs this process may use)")
    p.add_argument("--out", type=Path, default=None,
                   help=f"JSON output (default bench/results/{name}[_SIZE].json)")
    p.add_argument("--seed", type=int, default=0)
    return p


def setup(args: argparse.Namespace, name: str) -> dict[str, Any]:
    """Apply ``--threads``, fill in ``--out``; returns the machine facts (after the thread set)."""
    threads = args.threads or (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
                               else os.cpu_count() or 1)
    torch.set_num_threads(threads)
    args.threads = threads
    if args.out is None:
        suffix = "" if args.size == "default" else f"_{args.size}"
        args.out = RESULTS_DIR / f"{name}{suffix}.json"
    return machine_info()


# --------------------------------------------------------------------------------------------
# Peak memory of a process (Linux)
# --------------------------------------------------------------------------------------------


def _status_kib(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def rss_bytes() -> int | None:
    """Current resident set size of this process (VmRSS)."""
    kib = _status_kib("VmRSS")
    return None if kib is None else kib * 1024


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark (VmHWM) of this process; True when it worked.

    Writing 5 to /proc/self/clear_refs (Linux >= 4.0) sets VmHWM to the current RSS, so the
    peak read afterwards is the peak of what runs after this call only.
    """
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def peak_rss_bytes() -> int | None:
    """Peak resident set size (VmHWM) of this process since start or the last reset."""
    kib = _status_kib("VmHWM")
    return None if kib is None else kib * 1024


def _jsonable(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # JSON has no inf/nan; keep them readable
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, torch.dtype):
        return str(value)
    return value


def write_result(path: Path, payload: dict[str, Any]) -> Path:
    """Write the benchmark JSON (atomically) and return its path."""
    payload = dict(payload)
    payload.setdefault("machine", {})["loadavg_end"] = (
        list(os.getloadavg()) if hasattr(os, "getloadavg") else None)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_suffix(path.suffix + f".tmp{os.getpid()}")
    temporary.write_text(json.dumps(_jsonable(payload), indent=1))
    os.replace(temporary, path)
    return path


def print_table(title: str, header: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    """A small Markdown table on stdout (the JSON holds the full data)."""
    def fmt(value: Any) -> str:
        if isinstance(value, float):
            return f"{value:.4g}"
        return str(value)

    print(f"\n{title}")
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for row in rows:
        print("| " + " | ".join(fmt(v) for v in row) + " |")


# --------------------------------------------------------------------------------------------
# Workers: one fresh process per memory measurement
# --------------------------------------------------------------------------------------------


def run_worker(script: Path, arguments: Sequence[str], *, timeout: float = 900) -> dict:
    """Run ``python script --worker ARGUMENTS`` in a fresh process; return the JSON dict it
    prints as its last stdout line (a fresh process so that its peak RSS is its own)."""
    import subprocess

    command = [sys.executable, str(script), "--worker", *arguments]
    done = subprocess.run(command, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "PYTHONPATH": str(BENCH_DIR)})
    if done.returncode != 0:
        raise RuntimeError(f"worker {command} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])
