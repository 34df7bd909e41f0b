"""Read Replicate model pages saved as text ("seed pages") and compare them with an OpenAPI schema.

A seed page is the text of a model version's API page. Its "Input schema" section lists one
field per input, in input order, with a type, an optional default, optional `Min:` / `Max:`,
optional `Options:` (inline enums) and a description. Its "Output schema" section holds the
output schema as a Python-repr dict. The saved text comes in two layouts:

- table: markdown-ish rows `| name | type | default | description |` whose cells span lines;
  a row without default, Min or Max has one cell fewer (`| name | type | description | |`);
- lines: one item per line: name, type, then optional default, `Options:` + a comma-separated
  list, `Min: X`, `Max: Y`, and last the description.

`property_as_seed_input` renders one schema property the way the page shows it (type `None` for
an `allOf` reference, `string (enum)` plus options for an inline enum, no `Min: 0`, booleans as
`True`/`False`, `3.0` as `3`), so that a test compares like with like.
"""

from __future__ import annotations

import ast
import math
import os
import re
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
SEEDS_ENV = "FLUX_LORA_SEEDS_DIR"

_REF_PREFIX = "#/components/schemas/"
_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_TYPE_RE = re.compile(r"^(?:string|integer|number|boolean|array|object|None)(?: \(enum\))?$")
_MIN_RE = re.compile(r"Min:\s*(\S+)")
_MAX_RE = re.compile(r"Max:\s*(\S+)")
_INPUT_HEADING_RE = re.compile(r"^\s*Input schema\s*$", re.MULTILINE)
_OUTPUT_HEADING_RE = re.compile(r"^\s*Output schema\s*$", re.MULTILINE)
_TABLE_RULE_RE = re.compile(r"^\|(?:-+\|)+[ \t]*$", re.MULTILINE)
_LINES_HEADER_RE = re.compile(r"^\s*Field Type Default value Description\s*$", re.MULTILINE)
_ROW_START_RE = re.compile(r"^(?=\|\s*[A-Za-z_][A-Za-z0-9_]*\s*\|)", re.MULTILINE)


@dataclass
class SeedInput:
    """One input as a model page shows it."""

    name: str
    type: str
    default: str | None = None
    minimum: float | None = None
    maximum: float | None = None
    description: str = ""
    options: list[str] | None = None


@dataclass
class SeedPage:
    """The inputs (in page order) and the output schema of one model page."""

    inputs: list[SeedInput]
    output: dict[str, Any]

    @property
    def names(self) -> list[str]:
        return [item.name for item in self.inputs]

    def input(self, name: str) -> SeedInput:
        """The input called `name` (KeyError if the page has none)."""
        for item in self.inputs:
            if item.name == name:
                return item
        raise KeyError(name)


def seeds_dir() -> Path | None:
    """`$FLUX_LORA_SEEDS_DIR` if set, else `<repo>/../shared/seeds` if it exists, else None."""
    configured = os.environ.get(SEEDS_ENV)
    if configured:
        return Path(configured)
    default = REPO_ROOT.parent / "shared" / "seeds"
    return default if default.is_dir() else None


def parse_seed_page(text: str) -> SeedPage:
    """Parse a saved model page in either layout; raises ValueError on text it cannot place."""
    inputs_part, output_part = _split_sections(text)
    rule = _TABLE_RULE_RE.search(inputs_part)
    if rule:
        inputs = _parse_table(inputs_part[rule.end() :])
    else:
        header = _LINES_HEADER_RE.search(inputs_part)
        if header is None:
            raise ValueError("no input table and no 'Field Type Default value Description' header")
        inputs = _parse_lines(inputs_part[header.end() :])
    if not inputs:
        raise ValueError("the page lists no inputs")
    return SeedPage(inputs=inputs, output=_parse_output(output_part))


def _split_sections(text: str) -> tuple[str, str]:
    start = _INPUT_HEADING_RE.search(text)
    end = _OUTPUT_HEADING_RE.search(text)
    if start is None or end is None or end.start() < start.end():
        raise ValueError("expected an 'Input schema' heading followed by an 'Output schema' heading")
    return text[start.end() : end.start()], text[end.end() :]


def _parse_table(body: str) -> list[SeedInput]:
    inputs = []
    for row in _ROW_START_RE.split(body):
        if not row.strip():
            continue
        if not row.rstrip().endswith("|"):
            raise ValueError(f"table row does not end with '|': {row!r}")
        # Drop what precedes the first '|' and follows the last one.
        cells = [cell.strip() for cell in row.split("|")][1:-1]
        if len(cells) != 4:
            raise ValueError(f"expected 4 cells, got {len(cells)}: {row!r}")
        name, type_, values, description = cells
        if description == "":  # no default/Min/Max: the description sits in the third cell
            values, description = "", values
        inputs.append(_make_input(name, type_, values, description))
    return inputs


def _parse_lines(body: str) -> list[SeedInput]:
    lines = [line.strip() for line in body.splitlines() if line.strip()]
    # A field starts where a name line is followed by a type line.
    starts = [i for i in range(len(lines) - 1) if _NAME_RE.match(lines[i]) and _TYPE_RE.match(lines[i + 1])]
    if not starts or starts[0] != 0:
        raise ValueError(f"expected a field name and type first, got {lines[:2]!r}")
    inputs = []
    for start, end in zip(starts, [*starts[1:], len(lines)], strict=True):
        name, type_, *rest = lines[start:end]
        if not rest:
            raise ValueError(f"field {name!r} has no description")
        *values, description = rest
        inputs.append(_make_input(name, type_, "\n".join(values), description))
    return inputs


def _make_input(name: str, type_: str, values: str, description: str) -> SeedInput:
    """Build an input from the text of its default cell (default, Options, Min, Max)."""
    if not _NAME_RE.match(name) or not _TYPE_RE.match(type_):
        raise ValueError(f"unexpected field name or type: {name!r}, {type_!r}")
    minimum = _bound(_MIN_RE, values)
    maximum = _bound(_MAX_RE, values)
    rest = _MAX_RE.sub("", _MIN_RE.sub("", values))
    options = None
    if "Options:" in rest:
        rest, _, listed = rest.partition("Options:")
        options = [option.strip() for option in listed.split(",") if option.strip()]
    default = rest.strip() or None
    if default is not None and "\n" in default:
        raise ValueError(f"field {name!r}: cannot tell default from description in {values!r}")
    return SeedInput(name, type_, default, minimum, maximum, description, options)


def _bound(pattern: re.Pattern[str], text: str) -> float | None:
    found = pattern.findall(text)
    if len(found) > 1:
        raise ValueError(f"more than one {pattern.pattern!r} in {text!r}")
    return float(found[0]) if found else None


def _parse_output(text: str) -> dict[str, Any]:
    start, end = text.find("{"), text.rfind("}")
    if start < 0 or end < start:
        raise ValueError("no output schema dict after 'Output schema'")
    output = ast.literal_eval(text[start : end + 1])
    if not isinstance(output, dict):
        raise ValueError("the output schema is not a dict")
    return output


# --- the schema side ---------------------------------------------------------------------------


def resolve(prop: dict[str, Any], components: dict[str, Any]) -> dict[str, Any]:
    """The schema a property stands for: its `allOf: [{$ref}]` target, or the property itself."""
    if "allOf" not in prop:
        return prop
    (ref,) = (part["$ref"] for part in prop["allOf"])
    if not ref.startswith(_REF_PREFIX):
        raise ValueError(f"unsupported reference {ref!r}")
    return components[ref.removeprefix(_REF_PREFIX)]


def enum_choices(prop: dict[str, Any], components: dict[str, Any]) -> list[str] | None:
    """A property's enum values as text, inline or behind an `allOf` reference; None if no enum."""
    enum = resolve(prop, components).get("enum")
    return None if enum is None else [render_value(value) for value in enum]


def render_value(value: Any) -> str:
    """A schema value as the page prints it: `True`/`False`, `3` for 3.0, `0.8`, text as is."""
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def property_as_seed_input(name: str, prop: dict[str, Any], components: dict[str, Any]) -> SeedInput:
    """Render one `Input` property the way a model page shows it."""
    target = resolve(prop, components)  # a dangling reference raises KeyError here
    if "allOf" in prop and "enum" not in target:
        raise ValueError(f"{name}: allOf reference to a schema without enum")
    # The page prints the property's own `type` (None for an allOf reference) and marks an
    # inline enum; `format` (e.g. uri) and `nullable` do not show.
    type_ = str(prop.get("type"))
    options = None
    if "enum" in prop:
        type_ += " (enum)"
        options = [render_value(value) for value in prop["enum"]]
    default = prop.get("default")
    minimum = prop.get("minimum")
    maximum = prop.get("maximum")
    return SeedInput(
        name=name,
        type=type_,
        default=None if default is None else render_value(default),
        minimum=None if minimum is None or minimum == 0 else float(minimum),  # the page hides Min: 0
        maximum=None if maximum is None else float(maximum),
        description=prop.get("description", ""),
        options=options,
    )


def input_differences(page: SeedInput, ours: SeedInput) -> list[str]:
    """One line per field where the page's input and the schema's rendering disagree."""
    return [
        f"{page.name}.{field.name}: page {getattr(page, field.name)!r} != schema {getattr(ours, field.name)!r}"
        for field in fields(SeedInput)
        if getattr(page, field.name) != getattr(ours, field.name)
    ]


def inputs_differences(page: SeedPage, openapi: dict[str, Any]) -> list[str]:
    """Every way the schema's `Input` differs from the page: names, order (`x-order`), fields."""
    components = openapi["components"]["schemas"]
    properties = components["Input"]["properties"]
    ours = sorted(properties, key=lambda name: properties[name].get("x-order", math.inf))
    differences = []
    if page.names != ours:
        differences.append(f"inputs: page {page.names} != schema (by x-order) {ours}")
    for index, item in enumerate(page.inputs):
        prop = properties.get(item.name)
        if prop is None:
            differences.append(f"{item.name}: on the page, missing from the schema")
            continue
        if prop.get("x-order") != index:
            differences.append(
                f"{item.name}.x-order: page position {index} != schema {prop.get('x-order')!r}"
            )
        differences += input_differences(item, property_as_seed_input(item.name, prop, components))
    return differences
