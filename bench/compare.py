"""Side by side: one benchmark script against this tree and an older revision of it,
in alternating rounds on the same machine, so that the machine's swings hit both.

    .venv/bin/python bench/compare.py --baseline 96dcfff --rounds 5 router_capacity.py \\
        -- --prompts 50000 --capacity 32 --repeat 1

The script (any of bench/*.py that prints one JSON document) is this tree's; the
package it imports — client, router, workers, engines — is the revision's, through a
PYTHONPATH that maps ``exgen.client``/``exgen.daemon`` onto a detached worktree of
it (the daemon's subprocesses inherit it). Prints the per-round numbers and the
medians of the per-round ratios (this tree ÷ baseline) of every numeric field.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


def worktree(revision: str, into: Path) -> Path:
    """A PYTHONPATH directory whose ``exgen`` package is ``revision``'s tree."""
    tree = into / "tree"
    subprocess.run(
        ["git", "-C", str(ROOT), "worktree", "add", "--detach", "-f", str(tree), revision],
        check=True,
        capture_output=True,
    )
    shim = into / "path" / "exgen"
    shim.mkdir(parents=True)
    for part in ("client", "daemon"):
        (shim / part).symlink_to(tree / part)
    return shim.parent


def run_once(script: str, args: list[str], pythonpath: Path | None) -> dict[str, Any]:
    env = {**os.environ}
    if pythonpath is not None:
        env["PYTHONPATH"] = str(pythonpath)
    out = subprocess.run(
        [sys.executable, str(ROOT / "bench" / script), *args],
        cwd=ROOT / "bench",
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    doc: dict[str, Any] = json.loads(out.stdout)
    doc.pop("machine", None)
    return doc


def numbers(doc: dict[str, Any], prefix: str = "") -> dict[str, float]:
    """Every numeric leaf, by dotted path; a list of records (one per engine, say) by
    index, ``results.0.ratio``; lists of numbers (runs) are left out."""
    out: dict[str, float] = {}
    for key, value in doc.items():
        path = f"{prefix}{key}"
        if isinstance(value, bool):
            continue
        if isinstance(value, int | float):
            out[path] = float(value)
        elif isinstance(value, dict):
            out.update(numbers(value, f"{path}."))
        elif isinstance(value, list):
            for i, element in enumerate(value):
                if isinstance(element, dict):
                    out.update(numbers(element, f"{path}.{i}."))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--baseline", required=True, help="a git revision")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("script")
    parser.add_argument("args", nargs=argparse.REMAINDER)
    opts = parser.parse_args()
    args = opts.args[1:] if opts.args[:1] == ["--"] else opts.args
    with tempfile.TemporaryDirectory(prefix="exgen-compare-") as tmp:
        base_path = worktree(opts.baseline, Path(tmp))
        rounds: list[dict[str, dict[str, float]]] = []
        try:
            for n in range(opts.rounds):
                order = [("baseline", base_path), ("this", None)]
                if n % 2:
                    order.reverse()  # neither side always goes first
                got = {name: numbers(run_once(opts.script, args, path)) for name, path in order}
                rounds.append(got)
                print(f"round {n + 1}: {json.dumps(got)}", file=sys.stderr, flush=True)
        finally:
            subprocess.run(
                ["git", "-C", str(ROOT), "worktree", "remove", "--force", str(Path(tmp) / "tree")],
                capture_output=True,
            )
    summary: dict[str, Any] = {}
    for key in rounds[0]["this"]:
        pairs = [(r["baseline"].get(key), r["this"][key]) for r in rounds]
        ratios = [t / b for b, t in pairs if b]
        summary[key] = {
            "baseline": statistics.median(b for b, _ in pairs if b is not None),
            "this": statistics.median(t for _, t in pairs),
            "ratio_median": round(statistics.median(ratios), 3) if ratios else None,
            "ratios": [round(r, 3) for r in ratios],
        }
    print(json.dumps({"baseline": opts.baseline, "rounds": opts.rounds, "script": opts.script,
                      "args": args, "summary": summary}, indent=2))  # fmt: skip


if __name__ == "__main__":
    main()
