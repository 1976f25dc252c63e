"""A YAML file read strictly: a repeated key is an error, and nesting and the expansion of aliases are bounded, so a
broken or hostile file is a one-line error naming its line rather than a traceback, a silently dropped section or a
hang."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml


class UnreadableFile(Exception):
    """The file cannot be read as text; the message names it."""


class InvalidYaml(Exception):
    """The text is not valid YAML, or passes a bound; the message names the line and column."""


def read(path: Path) -> Any:
    """The YAML document in `path`, as plain Python values (safe_load's types).

    Raises `UnreadableFile` (its message names the file) or `InvalidYaml` (its message names the line and column)."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise UnreadableFile(f"{path}: cannot read: {exc.strerror or exc}") from None
    except UnicodeDecodeError as exc:
        raise UnreadableFile(f"{path}: cannot read: not UTF-8 text (bad byte at offset {exc.start})") from None
    try:
        return yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.MarkedYAMLError as exc:
        raise InvalidYaml(_describe_yaml_error(exc)) from None
    except yaml.YAMLError as exc:
        raise InvalidYaml(f"not valid YAML: {exc}") from None


def _describe_yaml_error(exc: yaml.MarkedYAMLError) -> str:
    mark = exc.problem_mark or exc.context_mark
    where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else "YAML"
    message = exc.problem or exc.context or "not valid YAML"
    if exc.problem and exc.context:
        context_line = f" that starts at line {exc.context_mark.line + 1}" if exc.context_mark else ""
        message += f" ({exc.context}{context_line})"
    return f"{where}: {message}"


#: Deepest nesting a configuration may have, counted through aliases too; ours goes 7 levels deep (a WES service's
#: `workflow_params`), and PyYAML builds nested values by recursion, which a few hundred levels exhaust.
MAX_YAML_DEPTH = 64
#: Most values a configuration may hold once every alias is counted as a copy of what it refers to. A real one holds
#: a few hundred, with a few small anchors; nine levels of nine aliases each ("billion laughs") stand for 10^9,
#: and checking them hung `check-config` and `run`.
MAX_YAML_VALUES = 100_000


class _UniqueKeyLoader(yaml.SafeLoader):
    """safe_load, except that a repeated key is an error: plain YAML silently keeps only the last one, so a second
    `services:` section would quietly drop the first. Nesting and the expansion of aliases are bounded
    (`MAX_YAML_DEPTH`, `MAX_YAML_VALUES`): anchors stay usable for sharing a few settings between services, and a
    hostile or broken file is an error naming its line instead of a traceback or a hang."""

    _depth = 0

    def compose_node(self, parent: yaml.Node | None, index: Any) -> yaml.Node | None:
        self._depth += 1
        try:
            if self._depth > MAX_YAML_DEPTH:
                mark = self.peek_event().start_mark  # type: ignore[no-untyped-call]  # PyYAML's stubs leave it bare
                raise yaml.composer.ComposerError(None, None, f"nested more than {MAX_YAML_DEPTH} levels deep", mark)
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def construct_document(self, node: yaml.Node) -> Any:
        _measure(node, 1, {}, set())
        return super().construct_document(node)

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        first_line: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<:` merges are meant to be overridden
                continue
            key = self.construct_object(key_node, deep=True)
            try:
                if key in first_line:
                    raise yaml.constructor.ConstructorError(
                        None,
                        None,
                        f"duplicate key {key!r} (first at line {first_line[key] + 1}); YAML would keep only the last",
                        key_node.start_mark,
                    )
                first_line[key] = key_node.start_mark.line
            except TypeError:  # unhashable key: the base class reports it
                break
        return super().construct_mapping(node, deep=deep)


def _measure(node: yaml.Node, depth: int, seen: dict[int, tuple[int, int]], open_: set[int]) -> tuple[int, int]:
    """(values, levels) of `node` and all under it, with every alias counted in full, computed once per node.

    Raises a ComposerError at the node where a limit is passed or where an alias refers to a value that contains
    it (a recursive value, which every walk over the configuration would follow forever)."""
    key = id(node)
    if depth > MAX_YAML_DEPTH:
        raise yaml.composer.ComposerError(
            None, None, f"nested more than {MAX_YAML_DEPTH} levels deep once its aliases are expanded", node.start_mark
        )
    if key in open_:
        raise yaml.composer.ComposerError(
            None, None, "an alias refers to a value that contains it (a recursive value)", node.start_mark
        )
    if key in seen:
        values, height = seen[key]
    else:
        open_.add(key)
        values, height = 1, 1
        children = node.value if isinstance(node, yaml.SequenceNode) else []
        if isinstance(node, yaml.MappingNode):
            children = [item for pair in node.value for item in pair]
        for child in children:
            child_values, child_height = _measure(child, depth + 1, seen, open_)
            values += child_values
            height = max(height, child_height + 1)
            if values > MAX_YAML_VALUES:
                raise yaml.composer.ComposerError(
                    None, None, f"holds more than {MAX_YAML_VALUES} values once its aliases are expanded "
                    "(a configuration needs a few hundred; is this a YAML alias bomb?)", node.start_mark,
                )
        open_.discard(key)
        seen[key] = values, height
    if depth + height - 1 > MAX_YAML_DEPTH:
        raise yaml.composer.ComposerError(
            None, None, f"nested more than {MAX_YAML_DEPTH} levels deep once its aliases are expanded", node.start_mark
        )
    return values, height
