"""Fill a frozen config dataclass from YAML and command-line flags (flags win over YAML)."""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from pathlib import Path

from loraplex.training.errors import ConfigError


def _scalar_type(annotation) -> type:
    """The type argparse converts with: `int | None` -> int, `list[str]` -> str."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return _scalar_type(args[0])
    if typing.get_origin(annotation) is list:
        return args[0]
    return annotation


def add_dataclass_flags(parser: argparse.ArgumentParser, cls: type) -> None:
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        flag = "--" + f.name.replace("_", "-")
        kind = _scalar_type(hints[f.name])
        common = dict(
            dest=f.name, default=argparse.SUPPRESS, help=f.metadata.get("help", "").replace("%", "%%")
        )  # argparse formats help with %
        if kind is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, **common)
        elif typing.get_origin(hints[f.name]) is list:
            parser.add_argument(flag, nargs="+", type=kind, **common)
        else:
            parser.add_argument(flag, type=kind, choices=f.metadata.get("choices"), **common)


def load_yaml(path: str | Path) -> dict:
    import yaml

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: malformed YAML ({exc})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of option: value")
    return {str(k).replace("-", "_"): v for k, v in data.items()}


def build_config(cls: type, yaml_values: dict, cli_values: dict):
    """The dataclass from defaults < YAML < CLI; unknown or missing keys are a ConfigError."""
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(yaml_values) - names)
    if unknown:
        raise ConfigError(f"unknown option(s) in config: {', '.join(unknown)}")
    values = {**yaml_values, **cli_values}
    missing = [
        "--" + f.name.replace("_", "-")
        for f in dataclasses.fields(cls)
        if f.name not in values and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    ]
    if missing:
        raise ConfigError(f"missing required option(s): {', '.join(missing)}")
    try:
        return cls(**values)
    except (TypeError, ValueError) as exc:
        raise ConfigError(str(exc)) from None


def parse_dataclass_args(cls: type, argv: list[str] | None, prog: str, description: str):
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument("--config", type=Path, help="YAML recipe; any flag can be set there too")
    add_dataclass_flags(parser, cls)
    args = vars(parser.parse_args(argv))
    config_path = args.pop("config", None)
    yaml_values = load_yaml(config_path) if config_path else {}
    return build_config(cls, yaml_values, args)
