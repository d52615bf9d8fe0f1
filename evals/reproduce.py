"""Rerun the committed results that are cheap on a CPU and compare them with the files.

    python -m evals.reproduce --list                  # what it can rerun, and the cost
    python -m evals.reproduce                         # rerun all, compare, exit 1 on a miss
    python -m evals.reproduce --only gfn_exact        # one of them
    python -m evals.reproduce --only gfn_exact --update   # rerun and overwrite the file

Each entry reruns its command into a scratch folder, then compares every number under
the entry's sections (timings, paths and provenance aside) with the committed file.
A run is deterministic for a given machine, torch version and thread count (the configs
fix the threads). Across CPUs it is not, unless the kernels are pinned: a few hundred
training steps grow AVX2-vs-AVX-512 rounding into a different trained model. So every
command runs with the kernels pinned to AVX2 (``ISA_ENV``: torch's own kernels, MKL in
its reproducible AVX2 mode, oneDNN), which every x86-64 CPU since 2013 runs. That gives
the same numbers on Intel CPUs, not across vendors: MKL takes other code paths on AMD,
and gfn_exact's final KL is 0.0034 on Intel and 0.0093 on an AMD EPYC, both pinned. So
a result folder may also hold ``summary.<vendor_id>.json`` (``--update-variant``, run on
such a machine): a rerun must match ``summary.json`` or its own vendor's file, to
``--rtol`` (default 5%), so that a wrong headline (the issue that started this: 0.0051
committed, 0.0091 rerun) still fails. ``--update`` copies the fresh files over the
committed ones, with the commit and command they came from (see llmsample.provenance).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from evals.paths import RESULTS

__all__ = ["ISA_ENV", "Entry", "ENTRIES", "cpu_vendor", "compare", "reproduce", "main"]

ROOT = Path(__file__).resolve().parent.parent
# the same CPU kernels on every x86-64 machine (module docstring); ignored elsewhere
ISA_ENV = {
    "ATEN_CPU_CAPABILITY": "avx2",
    "MKL_CBWR": "AVX2",
    "MKL_ENABLE_INSTRUCTIONS": "AVX2",
    "ONEDNN_MAX_CPU_ISA": "AVX2",
}
# keys of no scientific content: how long things took, where they went, who ran them
SKIP = {
    "wall_s",
    "elapsed_s",
    "samples_per_s",
    "timings",
    "machine",
    "provenance",
    "command",
    "commands",
    "out_dir",
    "out",
    "seconds",
    "threads",
    "torch_threads",
    "event",
}


@dataclass(frozen=True)
class Entry:
    """A committed result: the command that makes it (``{out}`` = the output folder), the
    files it writes there, and the sections of summary.json whose numbers must match."""

    name: str
    command: tuple[str, ...]
    files: tuple[str, ...]
    sections: tuple[str, ...]
    minutes: float  # rough cost on one CPU thread


def _recipe(name: str, script: str, minutes: float, sections=("base", "trained")) -> Entry:
    cmd = (
        "python",
        f"recipes/{script}.py",
        "--config",
        f"recipes/configs/{name}.yaml",
        "--out_dir",
        "{out}",
    )
    files = ("summary.json", "metrics.jsonl")
    return Entry(
        name,
        (*cmd, "--progress", "false") if script == "gfn_lora" else cmd,
        files,
        sections,
        minutes,
    )


ENTRIES = {
    e.name: e
    for e in (
        _recipe("gfn_exact", "gfn_lora", 1.0),
        _recipe("gfn_uniform_number", "gfn_lora", 1.5),
        _recipe(
            "twist_ctl_exact",
            "twist_ctl",
            6.0,
            ("base", "trained", "log_z_spread", "var_ratio_learned_vs_none", "tv"),
        ),
        Entry(
            "exact",
            ("python", "-m", "evals.run", "--task", "exact", "--out", "{out}"),
            ("summary.json", "results.md"),
            ("rows", "bounds"),
            6.0,
        ),
    )
}


def _numbers(obj, prefix: str = ""):
    """Yield (path, value) for every number in a JSON tree, skipping SKIP keys."""
    if isinstance(obj, dict):
        for k, v in obj.items():
            if k not in SKIP:
                yield from _numbers(v, f"{prefix}.{k}" if prefix else k)
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from _numbers(v, f"{prefix}[{i}]")
    elif isinstance(obj, (int, float)) and not isinstance(obj, bool):
        yield prefix, float(obj)


def compare(committed: dict, fresh: dict, sections, rtol: float, atol: float = 1e-6) -> dict:
    """Compare the numbers under ``sections`` of two summaries. Returns ``ok``, the number
    of values compared, the worst relative difference, and every mismatch (path, committed,
    fresh), a value present in one file only counting as a mismatch."""
    old = dict(kv for s in sections for kv in _numbers(committed.get(s), s))
    new = dict(kv for s in sections for kv in _numbers(fresh.get(s), s))
    bad, worst = [], 0.0
    for path in sorted(old.keys() | new.keys()):
        a, b = old.get(path), new.get(path)
        if a is None or b is None:
            bad.append((path, a, b))
            continue
        if math.isnan(a) or math.isnan(b) or math.isinf(a) or math.isinf(b):
            same = a == b or (math.isnan(a) and math.isnan(b))
            rel = 0.0 if same else math.inf
        else:
            rel = abs(a - b) / max(abs(a), atol)
            same = abs(a - b) <= atol + rtol * abs(a)
        worst = max(worst, rel)
        if not same:
            bad.append((path, a, b))
    return dict(ok=not bad and bool(old), compared=len(old), worst_rel=worst, mismatches=bad)


def cpu_vendor() -> str:
    """The CPU's vendor id (``GenuineIntel``, ``AuthenticAMD``, ...; Linux), else the
    machine name (``arm64``, ...)."""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("vendor_id"):
                return line.split(":", 1)[1].strip()
    return platform.machine() or "unknown"


def _load(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def reproduce(entry: Entry, rtol: float, update: bool = False, variant: bool = False) -> dict:
    """Rerun ``entry`` in a scratch folder and compare it with evals/artifacts/results/<name>
    (its ``summary.json``, else this CPU vendor's ``summary.<vendor>.json``). ``update``
    overwrites the committed files; ``variant`` writes the vendor's summary instead, where
    the rerun does not match ``summary.json``."""
    target = RESULTS / entry.name
    with tempfile.TemporaryDirectory(prefix=f"reproduce-{entry.name}-") as tmp:
        out = Path(tmp) / entry.name
        cmd = [c.replace("{out}", str(out)) for c in entry.command]
        cmd[0] = sys.executable if cmd[0] == "python" else cmd[0]
        t0 = time.time()
        env = os.environ | ISA_ENV
        run = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env)
        seconds = time.time() - t0
        if run.returncode != 0:
            tail = (run.stderr or run.stdout)[-2000:]
            return dict(ok=False, seconds=seconds, error=f"exit {run.returncode}: {tail}")
        fresh = json.loads((out / "summary.json").read_text())
        own = target / f"summary.{cpu_vendor()}.json"
        result = compare(_load(target / "summary.json"), fresh, entry.sections, rtol)
        main_ok = result["ok"]
        if not main_ok and own.is_file():
            result = compare(_load(own), fresh, entry.sections, rtol) | dict(against=own.name)
        result["seconds"] = seconds
        # fresh file -> committed file; a vendor file only where summary.json does not match
        writes = {}
        if variant and not main_ok:
            writes = {"summary.json": own}
        elif update:
            writes = {name: target / name for name in entry.files}
        committed_dir = f"evals/artifacts/results/{entry.name}"
        for name, dest in writes.items():  # the commands inside name the committed folder
            dest.parent.mkdir(parents=True, exist_ok=True)
            dest.write_text((out / name).read_text().replace(str(out), committed_dir))
        if writes:
            result["updated"] = True
    return result


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--only", nargs="+", choices=sorted(ENTRIES), help="rerun only these")
    p.add_argument("--rtol", type=float, default=0.05, help="relative tolerance (default 5%%)")
    p.add_argument("--update", action="store_true", help="overwrite the committed files")
    p.add_argument(
        "--update-variant",
        action="store_true",
        help="write this CPU vendor's summary.<vendor>.json beside the committed files "
        "(only where the rerun does not match summary.json)",
    )
    p.add_argument("--list", action="store_true", help="list the entries and stop")
    args = p.parse_args(argv)
    if not args.rtol >= 0:
        p.error(f"--rtol must be >= 0, got {args.rtol}")
    names = args.only or sorted(ENTRIES)
    if args.list:
        for n in names:
            e = ENTRIES[n]
            cmd = " ".join(e.command).replace("{out}", f"evals/artifacts/results/{n}")
            print(f"{n:20s} ~{e.minutes:g} min  {cmd}")
        return 0
    failed = []
    for n in names:
        print(f"[reproduce] {n}: running (~{ENTRIES[n].minutes:g} min) ...", flush=True)
        r = reproduce(ENTRIES[n], args.rtol, args.update, args.update_variant)
        if "error" in r:
            print(f"[reproduce] {n}: FAILED to run: {r['error']}")
            failed.append(n)
            continue
        verdict = "ok" if r["ok"] else "MISMATCH"
        print(
            f"[reproduce] {n}: {verdict}: {r['compared']} numbers, worst relative "
            f"difference {r['worst_rel']:.2g}, {r['seconds']:.0f} s"
            + (f" (matched {r['against']})" if r.get("against") else "")
            + (" (files updated)" if r.get("updated") else "")
        )
        for path, a, b in r["mismatches"][:10]:
            print(f"    {path}: committed {a}, rerun {b}")
        if not r["ok"]:
            failed.append(n)
    if failed:
        print(f"[reproduce] {len(failed)} of {len(names)} did not reproduce: {', '.join(failed)}")
        if not (args.update or args.update_variant):
            print("[reproduce] fix the code, or rerun with --update and commit the new files")
    return 1 if failed and not (args.update or args.update_variant) else 0


if __name__ == "__main__":
    sys.exit(main())
