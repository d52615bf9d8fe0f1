"""How the llmsample command prints its results: strict JSON (--json) or text.

llmsample generate "ROMEO:" --json | python -c "import json, sys; json.load(sys.stdin)"

from llmsample.cli.output import print_json, strict_json
strict_json({"log_z": float("-inf")})   # {"log_z": "-inf"}
"""

from __future__ import annotations

import json
import math

__all__ = ["strict_json", "print_json", "print_generate"]


def strict_json(value):
    """``value`` with every non-finite float as the string "inf", "-inf" or "nan" (strict
    JSON has no such numbers; ``json.dumps`` would write -Infinity)."""
    if isinstance(value, float) and not math.isfinite(value):
        return "nan" if math.isnan(value) else "inf" if value > 0 else "-inf"
    if isinstance(value, dict):
        return {k: strict_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [strict_json(v) for v in value]
    return value


def print_json(res) -> None:
    """``res`` on stdout as strict JSON (see :func:`strict_json`), indented."""
    print(json.dumps(strict_json(res), indent=2, allow_nan=False))


def print_generate(res: dict) -> None:
    """The summary of ``llmsample generate`` (:func:`llmsample.cli.generate.summary`) as text."""
    twist = f"  (twist: {res['twist']})" if res["twist"] else ""
    print(f"method: {res['method']}{twist}")
    for s in res["samples"]:
        print(f"  w={s['weight']:.3f}  {s['text']!r}")
    if res["log_z"] is not None:
        z = res["log_z"]
        print(
            f"log Z: {z:.3f}"
            + ("  (no particle satisfied the constraint)" if z == -math.inf else "")
        )
    if res["constraint_rate"] is not None:
        print(f"constraint satisfied by {res['constraint_rate']:.0%} of particles")
    print("ESS trace: " + " ".join(f"{e:.1f}" for e in res["ess"]))
    print(
        f"resampled at steps: {res['resampling_steps']}   forward tokens: {res['forward_tokens']}"
    )
