"""Run one bench for two checkouts, alternately, and put their medians side by side.

    python bench/compare.py --base /tmp/base --new . --rounds 3 magic.py -- --reps 7
    python bench/compare.py --base /tmp/base --new . --rounds 2 gateway.py -- --runs 2

Each round runs `bench/<script>` of the base checkout, then the new one (the order swapped every
round), each as its own process with that checkout first on PYTHONPATH, so that everything it
starts (gateway, host, kernels' extension) is that checkout's code. Every run's table is kept;
the summary gives, per row, each run's median, the median of those, and new over base (time:
below 1 is faster). On a shared machine a row moves with other load between runs: the
alternation spreads that over both sides, and the runs' spread shows how much there was."""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.harness import log

VALUE = re.compile(r"^\s*([0-9.]+)\s*(ms|s)\b")
RATE = re.compile(r"\(([0-9.]+) (?:MiB|MB)/s\)")
AMOUNT = re.compile(r"\b([0-9]+) (?:MiB|MB)\b")


def seconds(cell: str, what: str = "") -> float | None:
    """`153 ms (655 MB/s)`, `0.21 s (95 MiB/s)`: the time it starts with, in seconds. Where it
    gives a rate and `what` names the amount (`IOPub 20 MiB stdout`), the amount over the rate:
    `0.06 s (327 MiB/s)` is printed to 10 ms, its rate to 0.3%."""
    match = VALUE.match(cell)
    if match is None:
        return None
    rate, amount = RATE.search(cell), AMOUNT.search(what)
    if rate is not None and amount is not None and float(rate[1]) > 0:
        return float(amount[1]) / float(rate[1])
    return float(match[1]) / (1000 if match[2] == "ms" else 1)


def rows(output: str) -> dict[tuple[str, str], float]:
    """(measurement, path) -> median seconds, from a bench's markdown table."""
    found: dict[tuple[str, str], float] = {}
    for line in output.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) < 4 or not line.startswith("|") or cells[0] in ("measurement", "---"):
            continue
        value = seconds(cells[3], cells[0])
        if value is not None:
            found[(cells[0], cells[1])] = value
    return found


def run(checkout: Path, script: str, extra: list[str], limit: float) -> str:
    env = {**os.environ, "PYTHONPATH": str(checkout)}
    command = [sys.executable, str(checkout / "bench" / script), *extra]
    log(f"{checkout}: {' '.join(command[1:])}")
    done = subprocess.run(command, cwd=checkout, env=env, capture_output=True, text=True,
                          timeout=limit)  # fmt: skip
    if done.returncode != 0:
        raise SystemExit(f"{checkout}: {script} exited {done.returncode}:\n{done.stderr[-3000:]}")
    return done.stdout


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", type=Path, required=True, help="the old checkout")
    parser.add_argument("--new", type=Path, required=True, help="the new checkout")
    parser.add_argument("--rounds", type=int, default=3, help="runs of each (3)")
    parser.add_argument("--limit", type=float, default=1200, help="seconds per run (1200)")
    parser.add_argument("script", help="a bench in bench/, such as magic.py")
    parser.add_argument("extra", nargs="*", help="its arguments, after --")
    args = parser.parse_args()
    if not 1 <= args.rounds <= 20:
        parser.error("--rounds must be from 1 to 20")
    checkouts = {"base": args.base.resolve(), "new": args.new.resolve()}
    for name, path in checkouts.items():
        if not (path / "bench" / args.script).is_file():
            parser.error(f"--{name} {path} has no bench/{args.script}")
    started = time.perf_counter()
    results: dict[str, list[dict[tuple[str, str], float]]] = {"base": [], "new": []}
    outputs: list[str] = []
    for index in range(args.rounds):
        for name in ("base", "new") if index % 2 == 0 else ("new", "base"):
            output = run(checkouts[name], args.script, args.extra, args.limit)
            outputs.append(f"#### {name}, round {index + 1}\n\n{output}")
            results[name].append(rows(output))
    elapsed = time.perf_counter() - started
    print(f"command: `python bench/compare.py {' '.join(sys.argv[1:])}`")
    print(f"took: {elapsed:.0f} s; base {checkouts['base']}, new {checkouts['new']}")
    print()
    print("| measurement | path | base, each run | new, each run | base median | new median | "
          "new / base (time) |")  # fmt: skip
    print("|---|---|---|---|--:|--:|--:|")
    keys = [k for k in results["new"][0] if all(k in r for r in results["base"] + results["new"])]
    for key in keys:
        base = [r[key] for r in results["base"]]
        new = [r[key] for r in results["new"]]
        b, n = statistics.median(base), statistics.median(new)
        print(f"| {key[0]} | {key[1]} | {', '.join(ms(v) for v in base)} | "
              f"{', '.join(ms(v) for v in new)} | {ms(b)} | {ms(n)} | {n / b:.2f}x |")  # fmt: skip
    print()
    print("Each run's own output:\n")
    for output in outputs:
        print(output)


def ms(value: float) -> str:
    return f"{value * 1000:.1f} ms" if value < 1 else f"{value:.2f} s"


if __name__ == "__main__":
    main()
