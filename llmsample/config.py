"""Config dataclasses from YAML files and command-line flags, for recipes and tools.

    cfg = parse_config(PretrainConfig, ["--config", "run.yaml", "--lr", "1e-3"])
    sys.exit(run_recipe(PretrainConfig, main))     # a recipe's ``__main__``

Order of precedence: the dataclass defaults, then the YAML file given by ``--config``
(unknown keys are an error), then one flag per field (``--field_name`` or
``--field-name``). Each field's ``metadata["help"]`` becomes its ``--help`` text. Values
are converted to the field's annotated type (``int``, ``float``, ``str``, ``bool``,
``list[...]``, ``X | None``): ``lr: 3e-3`` (a string to YAML 1.1) becomes a float,
``lr: abc`` is an error. Range checks stay in the dataclass's ``__post_init__``.

Every config error is a ``ValueError`` with a one-line message naming the field and
where its value came from (the YAML file or the command line); :func:`run_recipe`
prints it and returns exit status 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import re
import sys
import types
import typing
from pathlib import Path

import yaml

__all__ = ["help_field", "build_parser", "parse_config", "run_recipe"]


def help_field(text: str, default):
    """A dataclass field with a help string (the recipe flags' ``--help``); a list default
    gets a fresh copy per instance."""
    if isinstance(default, list):
        return dataclasses.field(default_factory=lambda: list(default), metadata={"help": text})
    return dataclasses.field(default=default, metadata={"help": text})


def _parse_bool(text: str) -> bool:
    lowered = str(text).strip().lower()
    if lowered in ("1", "true", "yes", "y", "on"):
        return True
    if lowered in ("0", "false", "no", "n", "off"):
        return False
    raise argparse.ArgumentTypeError(f"not a boolean: {text!r}")


def _field_kind(tp) -> tuple[type, bool, bool]:
    """(base type, is_list, is_optional) of a dataclass field annotation."""
    optional = False
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        optional = len(args) < len(typing.get_args(tp))
        tp = args[0]
        origin = typing.get_origin(tp)
    if origin is list:
        return typing.get_args(tp)[0], True, optional
    return tp, False, optional


_NAMES = {bool: "a boolean", int: "an integer", float: "a number", str: "a string"}
_PLURALS = {bool: "booleans", int: "integers", float: "numbers", str: "strings"}


def _scalar(value, base):
    """``value`` as ``base`` (bool, int, float or str); raises ValueError if it is not one."""
    if base is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str | int) and not isinstance(value, float):
            try:
                return _parse_bool(str(value))
            except argparse.ArgumentTypeError:
                pass
    elif base is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, str):
            try:
                return int(value.strip())
            except ValueError:
                try:  # "1e3" (a string to YAML 1.1)
                    value = float(value)
                except ValueError:
                    value = None
        if isinstance(value, float) and value.is_integer():
            return int(value)
    elif base is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value.strip())
            except ValueError:
                pass
    elif base is str:
        if isinstance(value, str):
            return value
        if isinstance(value, int | float) and not isinstance(value, bool):
            return str(value)
    else:
        return value  # other annotations: left to the dataclass
    raise ValueError


def _coerce(value, tp):
    """``value`` converted to annotation ``tp``; ValueError(expected ...) if it cannot be."""
    base, is_list, optional = _field_kind(tp)
    what = _NAMES.get(base, getattr(base, "__name__", str(base)))
    what = f"a list of {_PLURALS.get(base, what)}" if is_list else what
    if value is None:
        if optional:
            return None
        raise ValueError(f"expected {what}, got null")
    if is_list:
        if isinstance(value, str):  # "a, b" -> ["a", "b"]
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, list | tuple):
            raise ValueError(f"expected a list, got {value!r}")
        out = []
        for item in value:
            try:
                out.append(_scalar(item, base))
            except ValueError:
                raise ValueError(f"expected {what}, got {item!r} in it") from None
        return out
    try:
        return _scalar(value, base)
    except ValueError:
        raise ValueError(f"expected {what}, got {value!r}") from None


def _flag_type(base, optional: bool):
    """An argparse ``type`` converting a flag's text to ``base`` (None for none/null)."""

    def convert(text: str):
        if optional and text.strip().lower() in ("none", "null"):
            return None
        return _scalar(text, base)

    convert.__name__ = base.__name__  # argparse's message: "invalid float value: 'abc'"
    return convert


class _Parser(argparse.ArgumentParser):
    """Usage errors raise ValueError (one line) instead of printing usage and exiting."""

    def error(self, message: str):
        raise ValueError(f"command line: {message} (see --help)")


def build_parser(cls: type, description: str | None = None) -> argparse.ArgumentParser:
    """An argparse parser with ``--config`` plus one flag per field of dataclass ``cls``.
    Its errors raise ValueError (see :func:`parse_config`)."""
    parser = _Parser(description=description, argument_default=argparse.SUPPRESS)
    parser.add_argument("--config", help="YAML file of field values; flags override it.")
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        base, is_list, optional = _field_kind(hints[f.name])
        names = [f"--{f.name}"] + ([f"--{f.name.replace('_', '-')}"] if "_" in f.name else [])
        default = f.default_factory() if callable(f.default_factory) else f.default
        text = f"{f.metadata.get('help', '')} (default: {default!r})".replace("%", "%%")
        kwargs: dict = {"help": text, "dest": f.name}
        if is_list:
            kwargs.update(nargs="*", metavar=f.name.upper())
            if base in _NAMES:
                kwargs.update(type=_flag_type(base, False))
        elif base is bool:
            kwargs.update(type=_parse_bool, nargs="?", const=True, metavar="BOOL")
        elif base in _NAMES:
            kwargs.update(type=_flag_type(base, optional))
        else:
            kwargs.update(type=base)
        parser.add_argument(*names, **kwargs)
    return parser


def _load_yaml(path: str) -> dict:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as e:
        raise ValueError(f"{path}: cannot read the config file ({e.strerror or e})") from None
    try:
        values = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or str(e)
        problem = " ".join(str(problem).split())
        raise ValueError(f"{path}: invalid YAML{where}: {problem}") from None
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise ValueError(f"{path}: expected a mapping of field names to values")
    return values


def parse_config(cls: type, argv: list[str] | None = None, description: str | None = None):
    """Defaults, then ``--config`` YAML, then per-field flags; returns ``cls(**values)``.

    Raises ValueError (one line, naming the field and the file or the command line) for
    unreadable or malformed YAML, unknown fields, values of the wrong type and values
    that ``cls.__post_init__`` refuses."""
    args = vars(build_parser(cls, description).parse_args(argv))
    config_file = args.pop("config", None)
    hints = typing.get_type_hints(cls)
    known = [f.name for f in dataclasses.fields(cls)]
    values: dict = {}
    if config_file:
        values = _load_yaml(config_file)
        for key in values:
            if key not in known:
                close = difflib.get_close_matches(str(key), known, n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                raise ValueError(f"{config_file}: unknown field {key!r}{hint}")
        for key, value in list(values.items()):
            try:
                values[key] = _coerce(value, hints[key])
            except ValueError as e:
                raise ValueError(f"{config_file}: field {key!r}: {e}") from None
    values.update(args)
    try:
        return cls(**values)
    except (ValueError, TypeError) as e:
        message = " ".join(str(e).split())
        named = set(re.findall(r"\w+", message)) & set(known)
        if named & set(args) or not config_file:
            source = "command line"
        else:
            source = config_file
        raise ValueError(f"{source}: {message}") from None


def run_recipe(cls: type, main, description: str | None = None, argv: list[str] | None = None):
    """A recipe's ``__main__``: ``sys.exit(run_recipe(Config, main, __doc__))``.

    Parses the config (a config error: one line on stderr, status 2), runs
    ``main(cfg)`` (a :class:`~llmsample.train.checkpoints.ResumeConflict`: one line, status 2)
    and reads its summary: a run stopped by SIGINT / SIGTERM (``summary
    ["stopped_by_signal"]``, after its checkpoint) prints one line saying so and how to
    resume and returns 130 / 143. Otherwise 0."""
    from llmsample.train.checkpoints import ResumeConflict

    prog = Path(sys.argv[0]).name or "recipe"
    try:
        cfg = parse_config(cls, argv, description)
    except ValueError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
    try:
        summary = main(cfg)
    except ResumeConflict as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
    stop = (summary or {}).get("stopped_by_signal")
    if not stop:
        return 0
    if _is_main_process():
        again = "the same command without --overwrite" if cfg.overwrite else "the same command"
        out = Path(cfg.out_dir) / "checkpoints"
        print(
            f"{prog}: stopped by {stop['signal']} at step {stop['step']} (checkpoint saved "
            f"in {out}); rerun {again} to resume",
            file=sys.stderr,
            flush=True,
        )
    return int(stop["exit_status"])


def _is_main_process() -> bool:
    try:
        from accelerate import PartialState

        return PartialState().is_main_process
    except Exception:  # noqa: BLE001 (no accelerate state: a single process)
        return True
