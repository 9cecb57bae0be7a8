"""The config file: TOML read strictly into a `Config`, `section.key=value` overrides, and the
resolved config written back as TOML.

Unknown sections and keys and values of the wrong type are rejected with the key named;
overrides are parsed as TOML values, falling back to a plain string. Relative paths in a file
are relative to that file's folder; relative paths in overrides are relative to the working
directory. The sections and their fields are `sdlora.config`'s.
"""

from __future__ import annotations

import dataclasses
import math
import tomllib
import types
import typing
from pathlib import Path
from typing import Any

import tomli_w

from sdlora.config import BASE_HINT, SECTIONS, Config
from sdlora.errors import SdloraError

# Fields holding file-system paths: made absolute when the config is loaded.
PATH_FIELDS = {
    ("dataset", "path"),
    ("dataset", "cache_dir"),
    ("dataset", "validation_path"),
    ("output", "dir"),
    ("model", "config_dir"),
    ("lora", "init_from"),
}


def load_config(
    path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()
) -> Config:
    """Read a TOML config file (or start from defaults) and apply `section.key=value` overrides."""
    raw: dict[str, dict[str, Any]] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise SdloraError(f"config file {path} does not exist")
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise SdloraError(f"config file {path} is not valid TOML: {e}") from None
        except OSError as e:
            raise SdloraError(f"config file {path} cannot be read: {e.strerror}") from None
        raw = read_config_text(text, path.resolve().parent, str(path))
    for item in overrides:
        section, key, value = parse_override(item)
        single = {section: {key: value}}
        _absolutise(single, Path.cwd())
        if not isinstance(raw.get(section, {}), dict):
            raise SdloraError(f"[{section}] in {path} must be a table of key = value pairs")
        raw.setdefault(section, {})[key] = single[section][key]
    config = config_from_dict(raw, source=str(path) if path else "defaults")
    if not Path(config.output.dir).is_absolute():  # the default run folder: under the cwd
        config = replace(config, output={"dir": str(Path.cwd() / config.output.dir)})
    return config


def read_config_text(text: str, folder: Path, source: str) -> dict[str, Any]:
    """The tables of a config file's TOML text, its relative paths made absolute from `folder`
    (the file's folder)."""
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise SdloraError(f"config file {source} is not valid TOML: {e}") from None
    _absolutise(raw, folder)
    _local_base(raw, folder)
    return raw


def parse_override(item: str) -> tuple[str, str, Any]:
    """Split `section.key=value`; the value is read as TOML (`3`, `true`, `["a"]`) or a string."""
    name, sep, text = item.partition("=")
    section, dot, key = name.strip().partition(".")
    if not sep or not dot or not key:
        raise SdloraError(
            f"override {item!r} must look like section.key=value (e.g. train.steps=500)"
        )
    try:
        value = tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        value = text
    return section, key.strip(), value


def config_from_dict(raw: dict[str, Any], source: str = "config") -> Config:
    """Build a Config from nested dicts, rejecting unknown sections/keys and wrong types."""
    sections = {}
    for section, values in raw.items():
        if section not in SECTIONS:
            raise SdloraError(
                f"unknown section [{section}] in {source}; known: {', '.join(SECTIONS)}"
            )
        if not isinstance(values, dict):
            raise SdloraError(f"[{section}] in {source} must be a table of key = value pairs")
        cls = SECTIONS[section]
        hints = typing.get_type_hints(cls)
        kwargs = {}
        for key, value in values.items():
            if key not in hints:
                raise SdloraError(
                    f"unknown key {section}.{key} in {source}; known: {', '.join(hints)}"
                )
            kwargs[key] = _coerce(f"{section}.{key}", value, hints[key])
        sections[section] = kwargs
    if "dataset" not in sections or "path" not in sections["dataset"]:
        raise SdloraError(f"{source} sets no dataset.path: point it at a folder of images")
    if "base" not in sections.get("model", {}):  # no default: a run needs a real base
        raise SdloraError(f"{source} sets no model.base: {BASE_HINT}")
    return Config(**{name: cls(**sections.get(name, {})) for name, cls in SECTIONS.items()})


def config_to_toml(config: Config) -> str:
    """The resolved config as TOML text (what a run folder's config.toml holds)."""
    tables = {}
    for section in SECTIONS:
        values = dataclasses.asdict(getattr(config, section))
        tables[section] = {k: v for k, v in values.items() if v is not None}  # TOML has no null
    return tomli_w.dumps(tables)


def replace(config: Config, **changes: dict[str, Any]) -> Config:
    """A copy of `config` with some fields changed: `replace(c, train={"steps": 3})`."""
    sections = {}
    for section, values in changes.items():
        sections[section] = dataclasses.replace(getattr(config, section), **values)
    return dataclasses.replace(config, **sections)


def _local_base(raw: dict, folder: Path) -> None:
    """`model.base` names a file or folder beside the config when one exists there; otherwise
    it stays as written (a hub id, `micro`, `tiny:sd1`, or a path from the working directory)."""
    model = raw.get("model")
    base = model.get("base") if isinstance(model, dict) else None
    if isinstance(base, str) and base and "\0" not in base and (folder / base).exists():
        model["base"] = str((folder / base).resolve())


def _absolutise(raw: dict, base: Path) -> None:
    for section, key in PATH_FIELDS:
        values = raw.get(section)
        value = values.get(key) if isinstance(values, dict) else None
        if isinstance(value, str) and value and "\0" not in value:  # NUL: refused in _coerce
            values[key] = str((base / Path(value).expanduser()).resolve())


def _coerce(name: str, value: Any, hint: Any) -> Any:
    """Check `value` against a field's type; ints are accepted for floats, lists for tuples.
    Floats must be finite, ints fit in 64 bits (TOML's range) and text has no NUL byte."""
    optional = False
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        optional, hint = True, args[0]
    if value is None and optional:
        return None
    if typing.get_origin(hint) is tuple:
        if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
            raise SdloraError(f"{name} must be a list of strings, got {value!r}")
        for item in value:
            _check_text(name, item)
        return tuple(value)
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if hint is int and isinstance(value, bool) or not isinstance(value, hint):
        raise SdloraError(f"{name} must be {hint.__name__}, got {type(value).__name__} {value!r}")
    if hint is float and not math.isfinite(value):
        raise SdloraError(f"{name} must be a finite number, got {value}")
    if hint is int and not -(2**63) <= value < 2**63:
        raise SdloraError(f"{name} must fit in 64 bits, got {value}")
    if hint is str:
        _check_text(name, value)
    return value


def _check_text(name: str, value: str) -> None:
    if "\0" in value:
        raise SdloraError(f"{name} contains a NUL byte: {value!r}")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:  # undecodable bytes on the command line arrive as surrogates
        raise SdloraError(f"{name} is not valid UTF-8 text: {value!r}") from None
