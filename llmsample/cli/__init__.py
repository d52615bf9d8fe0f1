"""The ``llmsample`` command line.

    llmsample generate "ROMEO:" --contains love --particles 32 --max-new-tokens 24
    llmsample generate "ROMEO:" --method ancestral --temperature 0.8 --json
    llmsample generate "ROMEO:\\n" --contains love --line --twist none   # SMC without a twist
    llmsample demo                      # SMC vs plain sampling on a hard constraint
    llmsample demo --model smollm2-135m-instruct   # the same on a chat model (CommonGen)
    llmsample models                    # the models known by name, and how to install them

Ordinary mistakes (an unknown model, a bad regex, conflicting flags, an impossible
constraint) print one clear line and exit with status 2; no traceback. Notes (a hub
download, a prompt beyond the trained length, a large memory estimate, an SMC run that
never resampled) go to stderr as single lines starting with ``llmsample:``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import warnings
from pathlib import Path

from llmsample.cli.common import UsageError, load_for_cli, note, use_chat

__all__ = ["main"]


CONTAINS_BONUS = 3.0  # the demo's: one word of the line found outweighs ~20 particles without
CONCEPT_BONUS = 2.0
JSON_HELP = (
    "machine-readable output (strict JSON: a number that is not finite, such as log_z of "
    'a run whose particles were all rejected, is the string "-inf", "inf" or "nan"; '
    "Python's float() reads it back)"
)


def _check_utf8(flag: str, text: str) -> None:
    """Command-line bytes that are not UTF-8 reach Python as lone surrogates (\\udcXX for
    byte XX), which no tokenizer takes."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        code = ord(text[err.start])
        what = f"byte 0x{code - 0xDC00:02x}" if 0xDC80 <= code <= 0xDCFF else f"U+{code:04X}"
        raise UsageError(
            f"{flag} is not valid UTF-8 text ({what} at character {err.start}); pass UTF-8 "
            "(check the terminal's or the file's encoding)"
        ) from None


def _add_model_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model",
        default="shakespeare-tiny",
        help="a model name (see `llmsample models`), a local folder or a hub id",
    )
    p.add_argument(
        "--adapter",
        default=None,
        help="a peft adapter folder (e.g. a GFlowNet policy): smc/importance use it as the "
        "proposal with the base model as target; ancestral samples it",
    )
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (checked up front)")
    p.add_argument("--seed", type=int, default=0, help="random seed")
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="CPU threads for torch (default: $OMP_NUM_THREADS if set, else half the cores; "
        "more threads than free cores slows decoding many-fold)",
    )
    p.add_argument(
        "--chat",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="send the prompt as a user message through the tokenizer's chat template "
        "(default: on when the tokenizer has a chat template, e.g. smollm2-135m-instruct)",
    )


def set_threads(args) -> int:
    """Pick torch's CPU thread count deliberately (see --threads) and return it."""
    import torch

    n = args.threads
    if n is None:
        env = os.environ.get("OMP_NUM_THREADS", "")
        n = int(env) if env.isdigit() and int(env) > 0 else max(1, (os.cpu_count() or 2) // 2)
    if n < 1:
        raise UsageError(f"--threads must be >= 1, got {n}")
    torch.set_num_threads(n)
    return n


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="llmsample", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="sample continuations of a prompt")
    g.add_argument("prompt", help="the prompt text (use '\\n' for a newline)")
    _add_model_flags(g)
    g.add_argument("--method", choices=["smc", "ancestral", "importance", "beam"], default="smc")
    g.add_argument("--particles", type=int, default=16, help="particles / samples / beams")
    g.add_argument("--max-new-tokens", type=int, default=32)
    g.add_argument(
        "--contains",
        action="append",
        default=[],
        metavar="WORD",
        help="the continuation must contain WORD (repeatable)",
    )
    g.add_argument(
        "--concept",
        action="append",
        default=[],
        metavar="WORD",
        help="the continuation must use WORD in some inflected form (repeatable; 'stand' is "
        "met by 'stood'); SMC resamples towards replies that already use more of them",
    )
    g.add_argument(
        "--twist",
        choices=["auto", "prefix", "none"],
        default="auto",
        help="smc/importance: 'prefix' resamples on the potential's prefix scores (the "
        "--bonus of --contains/--concept; the suffix likelihood of --infill-suffix); 'none' "
        "checks the constraint only on finished continuations, so SMC has nothing to "
        "resample on; 'auto' (default): prefix when a potential has prefix scores",
    )
    g.add_argument(
        "--bonus",
        "--concept-bonus",
        dest="bonus",
        type=float,
        default=None,
        help="the prefix twist of --contains/--concept: log psi = bonus x words (concepts) "
        f"used so far; default {CONTAINS_BONUS:g} for --contains, {CONCEPT_BONUS:g} for "
        "--concept; 0: no twist",
    )
    g.add_argument("--regex", default=None, help="the continuation must match this regex")
    g.add_argument(
        "--infill-suffix",
        default=None,
        metavar="TEXT",
        help="weight by the likelihood of TEXT following the continuation",
    )
    g.add_argument(
        "--temperature",
        type=float,
        default=1.0,
        help="proposal temperature (SMC/importance weights correct for it)",
    )
    g.add_argument("--line", action="store_true", help="stop each continuation at a newline")
    g.add_argument("--show", type=int, default=8, help="how many samples to print (>= 0)")
    g.add_argument("--json", action="store_true", help=JSON_HELP)

    d = sub.add_parser("demo", help="SMC vs plain sampling on a constrained line")
    _add_model_flags(d)
    d.add_argument(
        "--particles",
        type=int,
        default=None,
        help="per prompt (default: 256, or 32 on a chat model)",
    )
    d.add_argument("--json", action="store_true", help=JSON_HELP)

    m = sub.add_parser("models", help="list the models known by name")
    m.add_argument("--json", action="store_true", help=JSON_HELP)
    return parser


def run_models() -> list[dict]:
    """The embedded and named models: whether each is installed and converted."""
    from llmsample.hf.loading import DEFAULT_MODEL, EMBEDDED
    from llmsample.hf.named_models import NAMED, list_models

    rows = [
        dict(
            name=name,
            description="embedded in the package" + (" (default)" * (name == DEFAULT_MODEL)),
            installed=True,
            ready=path.exists(),
            path=str(path),
            install=None,
        )
        for name, path in EMBEDDED.items()
    ]
    for r in list_models():
        rows.append(
            dict(
                name=r.name,
                description=r.description,
                installed=r.installed,
                ready=r.cached,
                path=str(r.path),
                install=None if r.installed else NAMED[r.name].install,
            )
        )
    return rows


def _print_models(rows: list[dict]) -> None:
    for r in rows:
        state = "ready" if r["ready"] else "converted on first use" if r["installed"] else ""
        print(f"{r['name']:24s} {r['description']}")
        print(f"{'':24s} {state or 'not installed: ' + r['install']}   {r['path']}")


def _text_potentials(args) -> list:
    """The potentials that need no model, built (and validated) before loading one."""
    from llmsample.potentials.concepts import Concepts
    from llmsample.potentials.core import Contains, Regex

    for flag, values in [
        ("the prompt", [args.prompt]),
        ("--contains", args.contains),
        ("--concept", args.concept),
        ("--regex", [args.regex or ""]),
        ("--infill-suffix", [args.infill_suffix or ""]),
    ]:
        for text in values:
            _check_utf8(flag, text)
    parts = []
    bonus = args.bonus
    if bonus is not None and not (bonus >= 0 and math.isfinite(bonus)):
        raise UsageError(f"--bonus (the twist's prefix_bonus) must be finite and >= 0, got {bonus}")
    try:
        if args.contains:
            b = CONTAINS_BONUS if bonus is None else bonus
            parts.append(Contains(*args.contains, prefix_bonus=b))
        if args.concept:
            b = CONCEPT_BONUS if bonus is None else bonus
            parts.append(Concepts(*args.concept, prefix_bonus=b))
        if args.regex is not None:
            parts.append(Regex(args.regex))
    except ValueError as err:
        raise UsageError(str(err)) from None
    if args.infill_suffix is not None and not args.infill_suffix.strip():
        raise UsageError("--infill-suffix needs non-empty text")
    return parts


def _product(parts: list):
    from llmsample.potentials.core import Product

    return None if not parts else parts[0] if len(parts) == 1 else Product(*parts)


def decode_memory(model, rows: int, length: int, kv_copies: int = 1) -> int:
    """Bytes that decoding ``rows`` sequences of ``length`` tokens holds, roughly: per row,
    four fp32 next-token arrays of V floats (logits, log p, log q, q) and the KV cache,
    layers x (K, V) x kv_dim x length x dtype bytes, twice (resampling copies it)."""
    from llmsample.hf.session import vocab_size

    cfg = model.config
    cfg = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    layers = getattr(cfg, "num_hidden_layers", None) or getattr(cfg, "n_layer", 0) or 0
    hidden = getattr(cfg, "hidden_size", None) or getattr(cfg, "n_embd", 0) or 0
    heads = getattr(cfg, "num_attention_heads", None) or getattr(cfg, "n_head", 1) or 1
    kv_dim = (getattr(cfg, "num_key_value_heads", None) or heads) * (
        getattr(cfg, "head_dim", None) or hidden // heads
    )
    dtype_bytes = next(model.parameters()).element_size()
    kv = layers * 2 * kv_dim * length * dtype_bytes
    return rows * (4 * 4 * vocab_size(model) + 2 * kv_copies * kv)


def memory_limit(device: str) -> tuple[int, str] | None:
    """(bytes, what) that decoding may use: free GPU memory on CUDA, else the physical
    RAM (or a smaller cgroup limit); None when unknown."""
    import torch

    if torch.device(device).type == "cuda":
        return torch.cuda.mem_get_info(torch.device(device))[0], "free GPU memory"
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        return None
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        total = min(total, int(limit)) if limit.isdigit() else total
    except OSError:
        pass
    return total, "RAM"


def _check_memory(args, model, prompt_tokens: int) -> None:
    from llmsample.hf.session import context_length

    rows, length = args.particles, prompt_tokens + args.max_new_tokens
    if length > (context_length(model) or length):
        return  # beyond the context is a hard error of its own, reported by the sampler
    need = decode_memory(model, rows, length, kv_copies=2 if args.adapter else 1)
    limit = memory_limit(args.device)
    if limit is None:
        return
    have, what = limit
    gb = f"about {need / 1e9:.1f} GB (KV cache and next-token arrays)"
    if need > have:
        raise UsageError(
            f"--particles {rows} needs {gb}, more than the {have / 1e9:.1f} GB of {what}; "
            "lower --particles or --max-new-tokens"
        )
    if need > have / 2:
        note(f"warning: --particles {rows} needs {gb} of the {have / 1e9:.1f} GB of {what}")


def _check_length(args, model, tok, prompt_tokens: int) -> None:
    """Warn when prompt + continuation run past the length the model was trained at."""
    from llmsample.hf.loading import trained_length
    from llmsample.hf.session import context_length

    total, limit = prompt_tokens + args.max_new_tokens, context_length(model)
    trained = trained_length(model, tok)
    if trained is None or total <= trained or (limit is not None and total > limit):
        return  # beyond the context is a hard error later
    note(
        f"warning: prompt ({prompt_tokens} tokens) + --max-new-tokens {args.max_new_tokens} = "
        f"{total} tokens, more than the {trained}-token windows {args.model!r} was trained "
        "on; the text may degrade (shorten the prompt or lower --max-new-tokens)"
    )


def _twist(args, potential) -> str:
    """--twist resolved: 'auto' is 'prefix' when the potential has prefix scores."""
    has_prefix = potential is not None and potential.has_prefix
    if args.twist == "prefix" and not has_prefix:
        raise UsageError(
            "--twist prefix needs a potential with prefix scores: --contains or --concept "
            "(with --bonus > 0) or --infill-suffix; or use --twist none"
        )
    return "prefix" if args.twist == "prefix" or (args.twist == "auto" and has_prefix) else "none"


def run_generate(args) -> dict:
    import llmsample
    from llmsample.hf.prompts import encode_prompts, line_end_ids
    from llmsample.potentials.core import SuffixLikelihood
    from llmsample.proposals import LMProposal, ModelProposal

    if args.method == "beam" and args.temperature != 1.0:
        raise UsageError("--temperature has no effect with --method beam; drop one of them")
    if args.method in ("beam", "ancestral") and args.twist != "auto":
        raise UsageError(f"--twist has no effect with --method {args.method}; drop one of them")
    if not (args.temperature > 0 and math.isfinite(args.temperature)):
        raise UsageError(f"--temperature must be a finite number > 0, got {args.temperature}")
    if args.show < 0:
        raise UsageError(f"--show must be >= 0 (how many samples to print), got {args.show}")
    parts = _text_potentials(args)
    try:
        llmsample.SMCConfig(num_particles=args.particles, max_new_tokens=args.max_new_tokens)
    except ValueError as err:
        raise UsageError(str(err)) from None
    model, tok = load_for_cli(args)
    scorer = model
    if args.adapter is not None:  # potentials score with the base model, adapter off
        from llmsample.gfn import BaseView

        scorer = BaseView(model)
    if args.infill_suffix is not None:
        suffix = args.infill_suffix.replace("\\n", "\n")
        parts.append(SuffixLikelihood(scorer, tok, suffix, as_twist=args.twist == "prefix"))
    potential = _product(parts)
    twist = _twist(args, potential)
    prompt = args.prompt.replace("\\n", "\n")
    eos = line_end_ids(tok) if args.line else None
    chat = use_chat(args, tok)
    try:
        prompt_tokens = encode_prompts(tok, [prompt], chat=chat).input_ids.shape[1]
    except ValueError as err:
        raise UsageError(str(err)) from None
    _check_memory(args, model, prompt_tokens)
    _check_length(args, model, tok, prompt_tokens)
    common = dict(max_new_tokens=args.max_new_tokens, eos_token_id=eos, chat=chat)
    try:
        if args.method == "beam":
            out = llmsample.beam_generate(
                model, tok, [prompt], num_beams=args.particles, potential=potential, **common
            )
        elif args.method == "ancestral":
            out = llmsample.ancestral_generate(
                model,
                tok,
                [prompt],
                num_samples=args.particles,
                temperature=args.temperature,
                potential=potential,
                seed=args.seed,
                progress=True,
                **common,
            )
        else:
            fn = llmsample.smc_generate if args.method == "smc" else llmsample.importance_generate
            out = fn(
                model,
                tok,
                [prompt],
                potential=potential,
                twist=twist,
                num_particles=args.particles,
                proposal=ModelProposal(model, args.temperature)
                if args.adapter is not None
                else LMProposal(args.temperature),
                seed=args.seed,
                progress=True,
                **common,
            )
    except ValueError as err:
        raise UsageError(str(err)) from None
    rejected_all = out.log_z is not None and math.isinf(float(out.log_z[0]))
    if args.method == "smc" and potential is not None and not rejected_all:
        if not out.resampling_steps[0]:  # (all rejected is reported with log Z)
            _never_resampled_hint(twist)
    return _summary(out, args.show, twist if args.method in ("smc", "importance") else None)


def _never_resampled_hint(twist: str) -> None:
    if twist == "none":
        note(
            "hint: SMC never resampled: with --twist none the constraint is checked only on "
            "finished continuations, so every particle kept the same weight until then (this "
            "was importance sampling); --twist prefix resamples on prefix scores (--bonus > 0 "
            "for --contains/--concept)"
        )
    else:
        note(
            "hint: SMC never resampled: the prefix twist never made the weights uneven "
            "enough (ESS stayed above half the particles); try a larger --bonus"
        )


def _summary(out, show: int, twist: str | None) -> dict:
    lw = out.log_weights[0]
    order = lw.argsort(descending=True).tolist()
    log_z = None if out.log_z is None else float(out.log_z[0])
    sat = None
    if out.log_potential is not None:
        sat = float((out.log_potential[0] > -math.inf).double().mean())
    return dict(
        method=out.method,
        twist=twist,
        log_z=log_z,
        constraint_rate=sat,
        ess=[round(float(e), 2) for e in out.ess[0]],
        resampling_steps=out.resampling_steps[0],
        forward_tokens=out.num_forward_tokens,
        samples=[dict(text=out.texts[0][i], weight=math.exp(lw[i])) for i in order[:show]],
    )


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


def _print_json(res) -> None:
    print(json.dumps(strict_json(res), indent=2, allow_nan=False))


def _print_generate(res: dict) -> None:
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


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    args = build_parser().parse_args(argv)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="the potential rejected every particle")
            if args.command != "models":
                set_threads(args)
            if args.command == "generate":
                res = run_generate(args)
                _print_json(res) if args.json else _print_generate(res)
            elif args.command == "models":
                res = run_models()
                _print_json(res) if args.json else _print_models(res)
            else:
                from llmsample.cli.demo import print_demo, run_demo

                res = run_demo(args)
                _print_json(res) if args.json else print_demo(res)
    except UsageError as err:
        print(f"llmsample: error: {' '.join(str(err).split())}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # e.g. `llmsample generate ... --json | head`
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    return 0
