"""The conversion of YAML mappings into typed dataclasses (`daemon.validation`), apart from any configuration."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

import pytest

from daemon.validation import Check, Context, Invalid, convert_mapping, integer, matching, seconds, yaml_key


def _upper(value: Any, path: str, ctx: Context) -> str:
    if not isinstance(value, str):
        raise Invalid("must be a word")
    return value.upper()


def _nothing_but_none(value: Any, path: str, ctx: Context) -> str:
    if value is not None:
        raise Invalid("must be null")
    return "was null"


@dataclass(frozen=True)
class Sample:
    name: str = field(metadata=yaml_key(None))  # filled by the caller, never read from YAML
    count: Annotated[int, integer(1, 10)] = 1
    wait: Annotated[float, seconds(60)] = 1.0
    enabled: bool = False
    kind: Literal["a", "b"] = "a"
    code: Annotated[str, matching(r"[a-z]+", "lower-case letters")] = "x"
    word: Annotated[str, Check(_upper)] = "X"
    sender: Annotated[str, Check(_upper)] = field(default="", metadata=yaml_key("from"))
    limit: Annotated[int, integer(1, 5)] | None = None
    checked_null: Annotated[str | None, Check(_nothing_but_none)] = None


def convert(raw: Any, **options: Any) -> tuple[dict[str, Any] | None, list[str]]:
    ctx = Context(base_dir=Path("/"))
    return convert_mapping(raw, "sample", Sample, ctx, **options), ctx.problems


def test_valid_values_come_back_by_field_name_as_their_types() -> None:
    values, problems = convert({"count": 3, "wait": 2, "enabled": True, "kind": "b", "code": "abc", "word": "hi",
                                "from": "me", "limit": None})
    assert problems == []
    assert values == {"count": 3, "wait": 2.0, "enabled": True, "kind": "b", "code": "abc", "word": "HI",
                      "sender": "ME", "limit": None}
    assert isinstance(values["wait"], float)  # an integer number of seconds is still a number of seconds


def test_every_bad_value_is_reported_at_its_key_in_the_fields_words() -> None:
    values, problems = convert({"count": 0, "wait": "5s", "enabled": "yes", "kind": "c", "code": "ABC", "word": 5,
                                "limit": 9})
    assert problems == [
        "sample.count: must be an integer from 1 to 10, got 0",
        "sample.wait: must be a number of seconds greater than 0 and at most 60, got '5s'",
        "sample.enabled: must be true or false, got 'yes'",
        "sample.kind: must be one of a, b, got 'c'",
        "sample.code: must be lower-case letters, got 'ABC'",
        "sample.word: must be a word",
        "sample.limit: must be an integer from 1 to 5, got 9",
    ]
    assert values == {}


@pytest.mark.parametrize(("key", "value"), [
    ("count", True),  # a bool is an int in Python; `count: yes` is a mistake, not 1
    ("count", 2.0),
    ("count", "3"),
    ("wait", math.nan),
    ("wait", math.inf),
    ("wait", False),
    ("code", "abc def"),  # the pattern must match the whole text, not a part of it
])
def test_msgspec_is_strict_about_types(key: str, value: Any) -> None:
    values, problems = convert({key: value})
    assert values == {} and len(problems) == 1 and problems[0].startswith(f"sample.{key}: must be ")


def test_a_field_renamed_in_yaml_is_read_only_by_its_yaml_key() -> None:
    assert convert({"from": "me"}) == ({"sender": "ME"}, [])
    assert convert({"sender": "me"})[1][0].startswith("sample.sender: unknown key")
    assert convert({"name": "me"})[1][0].startswith("sample.name: unknown key")


def test_unknown_keys_name_the_nearest_known_one_or_all_of_them() -> None:
    problems = convert({"cuont": 2, "zzz": 1})[1]
    assert problems[0] == "sample.cuont: unknown key (did you mean 'count'?)"
    assert problems[1] == ("sample.zzz: unknown key (expected one of: count, wait, enabled, kind, code, word, from, "
                           "limit, checked_null)")


def test_null_is_none_where_the_type_allows_it_and_a_check_decides_otherwise() -> None:
    assert convert({"limit": None, "checked_null": None}) == ({"limit": None, "checked_null": "was null"}, [])
    assert convert({"count": None})[1] == ["sample.count: must be an integer from 1 to 10, got nothing (null)"]


def test_required_keys_and_secret_keys() -> None:
    values, problems = convert({"Password": "hunter2", "count": 2}, required=("word",), refuse_secrets=True)
    assert values == {"count": 2}
    assert problems == ["sample.Password: secrets are never stored in the YAML; use token_file or token_env",
                        "sample.word: required"]


def test_an_empty_value_is_an_empty_mapping_and_anything_else_is_named() -> None:
    assert convert(None) == ({}, [])
    assert convert(["count"], what="a mapping of settings") == (
        None, ["sample: must be a mapping of settings, got a list"])
