"""Medians of wrk runs saved as <case>.<round>.txt, and a table of them (used by the benches)."""

import re
import statistics
from pathlib import Path

UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3}


def parse(path):
    """Requests per second, p50 and p99 in milliseconds of one `wrk --latency` output."""
    text = Path(path).read_text()
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", text).group(1))
    latencies = re.findall(r"^\s+(50|99)%\s+([\d.]+)(us|ms|s)\s*$", text, re.M)
    pct = {p: float(v) * UNITS[u] for p, v, u in latencies}
    return rps, pct["50"], pct["99"]


def medians(work, rounds, cases):
    """For each case, the medians over the rounds of (req/s, p50 ms, p99 ms)."""
    results = {}
    for case in cases:
        runs = [parse(Path(work) / f"{case}.{r}.txt") for r in range(1, rounds + 1)]
        results[case] = tuple(statistics.median(run[i] for run in runs) for i in range(3))
    return results


def print_table(results):
    print(f"{'case':<12} {'req/s':>10} {'p50 ms':>8} {'p99 ms':>8}")
    for case, (rps, p50, p99) in results.items():
        print(f"{case:<12} {rps:>10.0f} {p50:>8.3f} {p99:>8.3f}")
    print()
