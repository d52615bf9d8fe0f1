"""Config dataclasses from YAML files and command-line flags, for recipes and tools.

    cfg = parse_config(PretrainConfig, ["--config", "run.yaml", "--lr", "1e-3"])

Order of precedence: the dataclass defaults, then the YAML file given by ``--config``
(unknown keys are an error), then one flag per field (``--field_name`` or
``--field-name``). Each field's ``metadata["help"]`` becomes its ``--help`` text;
validation stays in the dataclass's ``__post_init__``.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing

import yaml

__all__ = ["build_parser", "parse_config"]


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


def build_parser(cls: type, description: str | None = None) -> argparse.ArgumentParser:
    """An argparse parser with ``--config`` plus one flag per field of dataclass ``cls``."""
    parser = argparse.ArgumentParser(description=description, argument_default=argparse.SUPPRESS)
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
        elif base is bool:
            kwargs.update(type=_parse_bool, nargs="?", const=True, metavar="BOOL")
        elif optional:
            kwargs.update(type=lambda s, _t=base: None if s.lower() in ("none", "null") else _t(s))
        else:
            kwargs.update(type=base)
        parser.add_argument(*names, **kwargs)
    return parser


def parse_config(cls: type, argv: list[str] | None = None, description: str | None = None):
    """Defaults, then ``--config`` YAML, then per-field flags; returns ``cls(**values)``."""
    args = vars(build_parser(cls, description).parse_args(argv))
    values: dict = {}
    config_file = args.pop("config", None)
    if config_file:
        with open(config_file, encoding="utf-8") as fh:
            values = yaml.safe_load(fh) or {}
        if not isinstance(values, dict):
            raise ValueError(f"{config_file}: expected a mapping of field names to values")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"{config_file}: unknown fields {unknown}")
    values.update(args)
    return cls(**values)
