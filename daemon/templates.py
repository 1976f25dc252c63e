"""The `workflow_params` template of a WES service: the job's fields put into the JSON a workflow takes.

Its own module, below both `config` (which reports a template's problems with every other config problem) and the
WES adapter (which renders it for each job); it imports nothing of the daemon.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

#: Placeholders a `workflow_params` template may use. `{files}` is the input files as the server sees them (names
#: of attachments, or paths), as WDL and Nextflow take them; `{cwl_files}` the same as CWL `File` objects
#: (`{"class": "File", "location": ...}`) for a `File[]` input, `{cwl_file}` the one file of a job with one, for a
#: `File` input.
PLACEHOLDERS = ("files", "cwl_files", "cwl_file", "panel", "build", "population", "phasing", "r2_filter", "mode",
                "job_id", "name")
#: Placeholders that stand for a list or an object: only a whole string value can be one.
STRUCTURED = frozenset({"files", "cwl_files", "cwl_file"})
_PLACEHOLDER = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")


class TemplateError(ValueError):
    """A `workflow_params` template that cannot be rendered."""


def render_params(template: Any, fields: Mapping[str, Any]) -> Any:
    """`template` with `{placeholder}`s replaced by the job's fields, through dicts and lists.

    A string that is exactly one placeholder becomes the field's value itself: `"{files}"` a list of strings,
    `"{cwl_file}"` an object, `"{population}"` a string or null. Inside a longer string a field is text (null
    becomes ""), and a list or an object is refused. Unknown placeholders are left as they are (`template_problems`
    reports them)."""
    if isinstance(template, Mapping):
        return {key: render_params(value, fields) for key, value in template.items()}
    if isinstance(template, (list, tuple)):
        return [render_params(value, fields) for value in template]
    if not isinstance(template, str):
        return template
    whole = _PLACEHOLDER.fullmatch(template)
    if whole and whole.group(1) in fields:
        value = fields[whole.group(1)]
        return list(value) if isinstance(value, (list, tuple)) else value

    def substitute(match: re.Match[str]) -> str:
        name = match.group(1)
        if name not in fields:
            return match.group(0)
        value = fields[name]
        if isinstance(value, (list, tuple, Mapping)):
            raise TemplateError(f"{{{name}}} is a list or an object and must be a whole string value, not part of "
                                f"{template!r}")
        return "" if value is None else str(value)

    return _PLACEHOLDER.sub(substitute, template)


def template_problems(template: Any, path: str = "workflow_params") -> list[str]:
    """Every problem of a `workflow_params` template, each with its key path (for `check-config`)."""
    problems: list[str] = []
    if isinstance(template, Mapping):
        for key, value in template.items():
            problems += template_problems(value, f"{path}.{key}")
    elif isinstance(template, (list, tuple)):
        for index, value in enumerate(template):
            problems += template_problems(value, f"{path}[{index}]")
    elif isinstance(template, str):
        whole = _PLACEHOLDER.fullmatch(template)
        for match in _PLACEHOLDER.finditer(template):
            name = match.group(1)
            if name not in PLACEHOLDERS:
                problems.append(f"{path}: unknown placeholder {{{name}}} (known: {', '.join(PLACEHOLDERS)})")
            elif name in STRUCTURED and not whole:
                problems.append(f"{path}: {{{name}}} is a list or an object and must be the whole value, as "
                                f"\"{{{name}}}\"")
    return problems


def placeholders_used(template: Any) -> set[str]:
    """The placeholders a template uses anywhere."""
    if isinstance(template, Mapping):
        return set().union(*(placeholders_used(value) for value in template.values()))
    if isinstance(template, (list, tuple)):
        return set().union(*(placeholders_used(value) for value in template))
    if isinstance(template, str):
        return {match.group(1) for match in _PLACEHOLDER.finditer(template)}
    return set()
