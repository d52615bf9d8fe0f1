"""What every benchmark writes: machine info, and its own section of RESULTS.md.

    from report import machine_info, write_section
    info = machine_info(device="cpu", dtype="float32")
    write_section("benchmarks/RESULTS.md", "smc_overhead:cpu:random:prompt16", lines)

A section sits between ``<!-- KEY -->`` and ``<!-- /KEY -->`` markers; rewriting it leaves
every other section alone, so each table is what its own command last produced.
"""

import os
import platform
from pathlib import Path

import torch

from llmsample.provenance import machine

__all__ = ["INTRO", "machine_info", "write_section"]

INTRO = (
    "# Benchmark results\n\n"
    "Every table here is produced by the command named above it; rerunning that command\n"
    "replaces its own section (between `<!-- name:device -->` markers) and nothing else.\n"
)


def machine_info(device: str = "cpu", dtype: str = "float32") -> dict:
    """:func:`llmsample.provenance.machine` plus the benchmark's device and dtype, the GPU's
    name and the load averages at the start (the caller adds ``loadavg_end``)."""
    return machine() | dict(
        processor=platform.processor() or platform.machine(),
        device=device,
        dtype=dtype,
        device_name=torch.cuda.get_device_name() if device == "cuda" else "cpu",
        loadavg_start=list(os.getloadavg()),
    )


def write_section(markdown: str | Path, key: str, lines: list[str]) -> None:
    """Replace (or append) the section ``key`` of ``markdown`` with ``lines`` (markers
    added here)."""
    section = "\n".join([f"<!-- {key} -->", *lines, f"<!-- /{key} -->"]) + "\n"
    path = Path(markdown)
    text = path.read_text() if path.exists() else INTRO
    start, end = f"<!-- {key} -->", f"<!-- /{key} -->\n"
    if start in text and end in text:
        text = text[: text.index(start)] + section + text[text.index(end) + len(end) :]
    else:
        text = text.rstrip("\n") + "\n\n" + section
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
