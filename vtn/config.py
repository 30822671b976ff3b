"""Job configuration: frozen dataclasses, overridden by a YAML file and `--set section.key=value`.

Every job owns one dataclass whose fields are plain values or nested dataclasses (the sections).
`resolve(cls, yaml_path, sets)` builds it: defaults, then the YAML file, then each `--set` in order.
Unknown keys, values of the wrong type and values outside a field's range (`ranged`) are refused with a
`ConfigError` that names the key (and the range), so a typo never silently trains the wrong thing. `to_dict`
gives the resolved config for saving with every artifact (cache attributes, run directory, checkpoint).
"""

from __future__ import annotations

import contextlib
import dataclasses
import re
import types
import typing
from pathlib import Path
from typing import Any, Literal, Union

import yaml

from vtn.errors import UserError


class ConfigError(UserError):
    """A config file or override names an unknown key or gives a value of the wrong type or out of range."""


def ranged(default: Any, *, gt: float | None = None, ge: float | None = None, lt: float | None = None,
           le: float | None = None, flag: str | None = None) -> Any:
    """A config field whose value (each value, for a tuple; None is always allowed) must lie in the given bounds
    (gt: >, ge: >=, lt: <, le: <=). Checked with the type wherever a value is set (YAML, --set, a command-line
    flag, a sweep's grid), so every job that shares a section refuses the same values, naming the key and range
    (and `flag`, the command-line option that sets it). A section built in code calls `check_ranges`."""
    return dataclasses.field(default=default, metadata={"range": (gt, ge, lt, le), "flag": flag})


def check_ranges(cfg: Any, prefix: str) -> None:
    """Refuse any ranged field of the dataclass `cfg` outside its range, naming it as `prefix.key`."""
    for f in dataclasses.fields(cfg):
        if "range" in f.metadata:
            _check_range(getattr(cfg, f.name), f, f"{prefix}.{f.name}")


def _range_text(bounds: tuple) -> str:
    """"> 0", ">= 1", "[0, 1)": the bounds as a reader writes them."""
    gt, ge, lt, le = bounds
    low = (f"> {gt:g}", f"({gt:g}") if gt is not None else (f">= {ge:g}", f"[{ge:g}") if ge is not None else None
    high = (f"< {lt:g}", f"{lt:g})") if lt is not None else (f"<= {le:g}", f"{le:g}]") if le is not None else None
    return f"{low[1]}, {high[1]}" if low and high else (low or high)[0]


def _check_range(value: Any, field: dataclasses.Field, key: str) -> None:
    gt, ge, lt, le = bounds = field.metadata["range"]
    for v in value if isinstance(value, (list, tuple)) else (value,):
        if v is None:
            continue
        # Written as "not inside" so that NaN is refused too.
        if ((gt is not None and not v > gt) or (ge is not None and not v >= ge) or (lt is not None and not v < lt)
                or (le is not None and not v <= le)):
            flag = f" ({field.metadata['flag']})" if field.metadata.get("flag") else ""
            raise ConfigError(f"{key}{flag}: {value!r} is out of range; it must be {_range_text(bounds)}")


def to_dict(cfg: Any) -> dict:
    """The config as plain JSON/YAML-friendly values (tuples become lists)."""

    def plain(v):
        if dataclasses.is_dataclass(v):
            return {f.name: plain(getattr(v, f.name)) for f in dataclasses.fields(v)}
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        return v

    return plain(cfg)


# A scalar annotation: what it accepts (a bool is not a number) and what an error says it expected.
_SCALARS = {
    bool: (lambda v: isinstance(v, bool), "true/false"),
    float: (lambda v: isinstance(v, (int, float)) and not isinstance(v, bool), "a number"),
    int: (lambda v: isinstance(v, int) and not isinstance(v, bool), "an integer"),
    str: (lambda v: isinstance(v, str), "a string"),
}


def flat_dict(cfg: Any) -> dict:
    """The config's values by dotted key ("optim.lr"), as `--set` names them."""

    def flat(d: dict, prefix: str) -> dict:
        out = {}
        for k, v in d.items():
            out.update(flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {prefix + k: v})
        return out
    return flat(to_dict(cfg), "")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check `value` against the annotation `tp`, converting where it is lossless (int -> float, list -> tuple)."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        for arm in typing.get_args(tp):
            if arm is type(None):
                if value is None:
                    return None
                continue
            with contextlib.suppress(ConfigError):  # the next arm may fit
                return _coerce(value, arm, key)
        raise ConfigError(f"{key}: {value!r} does not fit {_name(tp)}")
    if origin is Literal:
        if value not in typing.get_args(tp):
            raise ConfigError(f"{key}: {value!r} is not one of {list(typing.get_args(tp))}")
        return value
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        args = typing.get_args(tp)
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(args) != len(value):
                raise ConfigError(f"{key}: expected {len(args)} values, got {len(value)}")
            return tuple(_coerce(v, a, key) for v, a in zip(value, args))
        item = args[0] if args else Any
        out = [_coerce(v, item, key) for v in value]
        return tuple(out) if origin is tuple else out
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return dict(value)
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping for section {tp.__name__}, got {value!r}")
        return merge(tp(), value, key + ".")
    if tp in _SCALARS:
        accepts, expected = _SCALARS[tp]
        if not accepts(value):
            raise ConfigError(f"{key}: expected {expected}, got {value!r}")
        return float(value) if tp is float else value
    if isinstance(tp, type) and isinstance(value, tp):
        return value
    raise ConfigError(f"{key}: {value!r} does not fit {_name(tp)}")


def _name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def merge(cfg: Any, updates: dict, prefix: str = "") -> Any:
    """A copy of `cfg` with `updates` (a possibly nested mapping, e.g. from explicit CLI flags) applied with the
    same checks as `--set`."""
    hints = typing.get_type_hints(type(cfg))
    fields = {f.name: f for f in dataclasses.fields(cfg)}
    changes = {}
    for k, v in updates.items():
        key = prefix + str(k)
        if k not in fields:
            raise ConfigError(f"unknown config key '{key}' (known: {', '.join(sorted(fields))})")
        current = getattr(cfg, k)
        if dataclasses.is_dataclass(current) and isinstance(v, dict):
            changes[k] = merge(current, v, key + ".")
        else:
            changes[k] = _coerce(v, hints[k], key)
            if "range" in fields[k].metadata:
                _check_range(changes[k], fields[k], key)
    return dataclasses.replace(cfg, **changes)


_NUMBER = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")


def parse_set(item: str) -> dict:
    """`a.b.c=value` -> {"a": {"b": {"c": value}}}; the value is read as YAML (so 3, 0.1, true, [1, 2] work)."""
    if "=" not in item:
        raise ConfigError(f"--set expects key=value, got '{item}'")
    key, raw = item.split("=", 1)
    value = yaml.safe_load(raw) if raw.strip() else ""
    if isinstance(value, str) and _NUMBER.fullmatch(value.strip()):
        value = float(value)  # YAML 1.1 reads "1e-3" (no dot) as a string; users mean the number
    out: dict = {}
    set_key(out, key.strip(), value)
    return out


def set_key(node: dict, key: str, value: Any) -> None:
    """node["a"]["b"]["c"] = value for the key "a.b.c", making the inner mappings that are missing."""
    *sections, last = key.split(".")
    for part in sections:
        node = node.setdefault(part, {})
    node[last] = value


def _deep_merge(into: dict, updates: dict) -> dict:
    for k, v in updates.items():
        if isinstance(v, dict) and isinstance(into.get(k), dict):
            _deep_merge(into[k], v)
        else:
            into[k] = v
    return into


def _file_and_sets(config_file: str | Path | None, sets: typing.Iterable[str]) -> dict:
    """The YAML file's mapping with each `--set` merged over it in order. Applied to a config at once, so that
    fields checked together (a model's hidden_size and num_heads) may be changed by separate items."""
    updates: dict = {}
    if config_file:
        path = Path(config_file)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        data = yaml.safe_load(path.read_text()) or {}
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: expected a mapping at the top level")
        updates = data
    for item in sets:
        _deep_merge(updates, parse_set(item))
    return updates


def resolve(cls: type, config_file: str | Path | None = None, sets: typing.Iterable[str] = (), base: Any = None) -> Any:
    """Defaults (or `base`), then the YAML file, then each `--set` override, in that order."""
    return merge(base if base is not None else cls(), _file_and_sets(config_file, sets))


VALUE = object()  # in a flag table: the flag's own value


def flag_updates(args, flags: dict) -> dict:
    """The command-line flags that were given (not None, not a store_true left False), as nested config updates.
    `flags` maps an argparse dest to a key ("section.key": the flag's value goes there) or to {key: value}
    (a flag setting several keys, or a constant; `VALUE` stands for the flag's value). Later entries win."""
    updates: dict = {}
    for dest, target in flags.items():
        value = getattr(args, dest, None)
        if value is None or value is False:
            continue
        for key, v in (target.items() if isinstance(target, dict) else ((target, VALUE),)):
            set_key(updates, key, value if v is VALUE else v)
    return updates


def job_config(cls: type, args, flags: dict, base: Any = None, recipes: dict | None = None,
               sizes: dict | None = None, size_sets: dict | None = None) -> Any:
    """Every job's settings, one rule: the base (`base`, else `recipes[args.recipe or "default"]`, else the
    defaults), with `sizes[args.model]` as its model section and `size_sets[recipe][args.model]` (other settings
    that go with the size under that recipe) when --model is given, then --config, then each
    --set, then the explicit flags (`flags`, see `flag_updates`). None when the job is resumed (--resume) and
    none of them is given: the run's saved config is used."""
    updates = _file_and_sets(getattr(args, "config", None), getattr(args, "sets", ()))
    given = flag_updates(args, flags)
    # --recipe and --model name a recipe and a size only in the jobs that have them (predict's --model is a run)
    recipe = getattr(args, "recipe", None) if recipes else None
    size = getattr(args, "model", None) if sizes else None
    if getattr(args, "resume", False) and not (recipe or size or updates or given or getattr(args, "config", None)):
        return None
    if base is None:
        base = recipes[recipe or "default"] if recipes else cls()
    if size:
        base = merge(dataclasses.replace(base, model=sizes[size]),
                     (size_sets or {}).get(recipe or "default", {}).get(size, {}))
    # The flags apply after the rest, so a value out of range in --set is refused even when a flag replaces it.
    return merge(merge(base, updates), given)


def add_config_args(parser, example: str) -> None:
    """The `--config` and `--set` options every job shares; `example` is a KEY=VALUE of that job."""
    parser.add_argument("--config", metavar="FILE.yaml", help="YAML file overriding the job's defaults")
    parser.add_argument(
        "--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
        help=f"override one config value, e.g. --set {example} (repeatable; applied after --config)",
    )
