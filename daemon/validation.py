"""YAML mappings turned into typed dataclasses by msgspec, with every problem reported at its key path.

A section's dataclass is its schema: each field declares its type and constraints (`Annotated[int, integer(1, 100)]`,
`Literal["url", "path"]`, `Annotated[str, matching(...)]`) and msgspec checks a value against them. A rule that no
type states (a path relative to the configuration file, a URL without credentials, a list of distinct values) is the
field's `Check`, a function of ours.

msgspec was chosen over pydantic for its weight: it adds 0.7 MiB to the daemon, pydantic 6.1 MiB (its import and the
validators it builds), which the Celery comparison's "≥ 5 × less memory" cannot absorb (bench/README). msgspec stops
at the first problem of the value it converts, by design; an operator editing a configuration wants every problem at
once. So a section is converted one key at a time (`convert_mapping`): one value, one type, one problem at most, and
every key is tried. That walk also reports unknown keys with the nearest known one, and refuses keys that would hold
a secret before their value is read. Problems are worded by the field's `Meta.description` and the value it got, not
by msgspec ("must be an integer from 1 to 100, got 0").
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import types
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import msgspec


class Invalid(Exception):
    """One problem with the value being converted; `convert_mapping` adds its key path."""


@dataclass
class Context:
    """What one configuration's conversion shares: where its relative paths start, and the problems found so far."""

    base_dir: Path
    problems: list[str] = field(default_factory=list)

    def report(self, where: str, message: str) -> None:
        self.problems.append(f"{where or '(top level)'}: {message}")


#: A check turns one YAML value into what its field holds, raising `Invalid` for a problem with the value itself;
#: the check of a nested section reports the problems inside it through the context and returns what was valid.
Convert = Callable[[Any, str, Context], Any]


@dataclass(frozen=True)
class Check:
    """A field's own rule, used instead of msgspec's conversion (`Annotated[Path, Check(path)]`)."""

    convert: Convert


def integer(low: int, high: int) -> msgspec.Meta:
    return msgspec.Meta(ge=low, le=high, description=f"an integer from {low} to {high}")


def seconds(high: float) -> msgspec.Meta:
    return msgspec.Meta(gt=0, le=high, description=f"a number of seconds greater than 0 and at most {high:g}")


def matching(regex: str, description: str) -> msgspec.Meta:
    """Text matching `regex` as a whole (msgspec searches a pattern; the anchors make it match all of the text)."""
    return msgspec.Meta(pattern=f"^(?:{regex})$", description=description)


def yaml_key(name: str | None) -> dict[str, str | None]:
    """A field's metadata naming its YAML key where that is not the field's name (`from`, a Python keyword); None:
    the field is not read from YAML at all (a service's name is its key in `services`)."""
    return {_YAML_KEY: name}


_YAML_KEY = "yaml_key"

_SECRET_KEYS = frozenset(
    {"token", "password", "passwd", "api_key", "apikey", "secret", "access_token", "auth_token", "x_auth_token"}
)
SECRET_MESSAGE = "secrets are never stored in the YAML; use token_file or token_env"


def is_secret_key(key: Any) -> bool:
    return isinstance(key, str) and key.lower().replace("-", "_") in _SECRET_KEYS


def join(where: str, key: Any) -> str:
    return f"{where}.{key}" if where else str(key)


def convert_mapping(
    raw: Any,
    where: str,
    schema: type,
    ctx: Context,
    *,
    required: tuple[str, ...] = (),
    refuse_secrets: bool = False,
    what: str = "a mapping",
) -> dict[str, Any] | None:
    """Convert one YAML mapping key by key into the fields of the dataclass `schema`, reporting unknown keys, bad
    values and missing `required` keys (YAML keys).

    Returns the converted values of the keys that were given and valid, by field name (an absent key keeps its
    field's default), or None when `raw` is not a mapping at all. An empty YAML value (`scheduler:`) counts as an
    empty mapping."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        ctx.report(where, f"must be {what}, got {got(raw)}")
        return None
    fields = _fields_by_key(schema)
    values: dict[str, Any] = {}
    for key, value in raw.items():
        path = join(where, key)
        if refuse_secrets and is_secret_key(key):
            ctx.report(path, SECRET_MESSAGE)  # never the value: it is the secret
        elif key not in fields:
            ctx.report(path, _unknown_key(str(key), fields))
        else:
            name, hint = fields[key]
            try:
                values[name] = convert_value(value, hint, path, ctx)
            except Invalid as exc:
                ctx.report(path, str(exc))
    for key in required:
        if key not in raw:
            ctx.report(join(where, key), "required")
    return values


def convert_value(value: Any, hint: Any, path: str, ctx: Context) -> Any:
    """One value as the type `hint` (a field's annotation) wants it; `null` is allowed where the type is optional."""
    union = typing.get_origin(hint) in (typing.Union, types.UnionType)
    members = typing.get_args(hint) if union else (hint,)
    if type(None) in members:
        if value is None:
            return None
        (hint,) = (member for member in members if member is not type(None))
    check = next((item for item in typing.get_args(hint)[1:] if isinstance(item, Check)), None)
    if check is not None:
        return check.convert(value, path, ctx)
    try:
        return msgspec.convert(value, hint)
    except msgspec.ValidationError:
        raise Invalid(f"must be {_described(hint)}, got {got(value)}") from None


def got(value: Any) -> str:
    """How a bad value is shown: short, in YAML's words. Never used for keys that may hold secrets."""
    if value is None:
        return "nothing (null)"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return repr(value if len(value) <= 60 else value[:57] + "...")
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    return f"a {type(value).__name__}"  # e.g. a date: YAML reads 2024-01-01 as one


@functools.cache
def _fields_by_key(schema: type) -> dict[str, tuple[str, Any]]:
    """YAML key -> (field name, annotation) of a dataclass, in field order."""
    hints = typing.get_type_hints(schema, include_extras=True)
    fields = {}
    for item in dataclasses.fields(schema):
        key = item.metadata.get(_YAML_KEY, item.name)
        if key is not None:
            fields[key] = (item.name, hints[item.name])
    return fields


def _unknown_key(key: str, known: Mapping[str, Any]) -> str:
    match = difflib.get_close_matches(key, list(known), n=1)
    if match:
        return f"unknown key (did you mean '{match[0]}'?)"
    return f"unknown key (expected one of: {', '.join(known)})"


def _described(hint: Any) -> str:
    """What a type expects, in an operator's words: its `Meta.description`, else its choices or its kind."""
    if typing.get_origin(hint) is typing.Annotated:
        for item in typing.get_args(hint)[1:]:
            if isinstance(item, msgspec.Meta) and item.description:
                return item.description
        hint = typing.get_args(hint)[0]
    if typing.get_origin(hint) is Literal:
        return "one of " + ", ".join(str(option) for option in typing.get_args(hint))
    if hint is bool:
        return "true or false"
    return {int: "an integer", float: "a number", str: "text"}.get(hint, getattr(hint, "__name__", str(hint)))
