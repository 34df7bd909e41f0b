"""Our committed OpenAPI schemas against the contract on Replicate's FLUX LoRA model pages.

The saved pages live outside the repository (see `seedpages.seeds_dir`). Pages 000, 002 and 004
show the canonical 21-input schema (`Predictor`, `.cog/openapi_schema.json`); 001 and 003 are
older versions, each reproduced by its own predictor (`.cog/schemas/<Class>.json`). Without the
pages these tests skip, except under CI (`CI` set), where a missing contract is a failure.
"""

from __future__ import annotations

import copy
import json
import os
from collections.abc import Callable
from typing import Any

import pytest

from tests.seedpages import (
    REPO_ROOT,
    SEEDS_ENV,
    SeedInput,
    SeedPage,
    enum_choices,
    inputs_differences,
    parse_seed_page,
    property_as_seed_input,
    seeds_dir,
)

SCHEMA_PATH = REPO_ROOT / ".cog" / "openapi_schema.json"
CANONICAL_PAGES = ["000", "002", "004"]
# Seed page -> the predictor of predict.py that reproduces it, and its committed schema.
VARIANT_PAGES = {"001": "FirstReleasePredictor", "003": "GoFastPredictor"}

# The canonical pages show these inputs with type None (an enum component) and hide the choices.
HIDDEN_ENUMS = {
    "aspect_ratio": [
        "1:1",
        "16:9",
        "21:9",
        "3:2",
        "2:3",
        "4:5",
        "5:4",
        "3:4",
        "4:3",
        "9:16",
        "9:21",
        "custom",
    ],
    "model": ["dev", "schnell"],
    "output_format": ["webp", "jpg", "png"],
    "megapixels": ["1", "0.25"],
}


@pytest.fixture(scope="module")
def openapi() -> dict[str, Any]:
    return json.loads(SCHEMA_PATH.read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def components(openapi: dict[str, Any]) -> dict[str, Any]:
    return openapi["components"]["schemas"]


def load_page(prefix: str) -> SeedPage:
    """Parse the seed page whose file name starts with `prefix`; skip (fail under CI) without pages."""
    folder = seeds_dir()
    if folder is None or not folder.is_dir():
        where = folder or REPO_ROOT.parent / "shared" / "seeds"
        reason = f"seed pages not found at {where}; set {SEEDS_ENV} to the folder of saved model pages"
        if "CI" in os.environ:
            pytest.fail(f"{reason} (CI is set, so the contract test may not be skipped)")
        pytest.skip(reason)
    matches = sorted(folder.glob(f"{prefix}_*.txt"))
    if len(matches) != 1:
        pytest.fail(f"expected one seed page {prefix}_*.txt in {folder}, found {len(matches)}")
    return parse_seed_page(matches[0].read_text(encoding="utf-8"))


@pytest.mark.parametrize("prefix", CANONICAL_PAGES)
def test_canonical_page_inputs_match_schema(prefix: str, openapi: dict[str, Any]) -> None:
    page = load_page(prefix)
    assert len(page.inputs) == 21
    differences = inputs_differences(page, openapi)
    assert not differences, "schema differs from seed page " + prefix + ":\n" + "\n".join(differences)


@pytest.mark.parametrize("prefix", CANONICAL_PAGES)
def test_canonical_page_hidden_enums_are_known(prefix: str, components: dict[str, Any]) -> None:
    page = load_page(prefix)
    hidden = {item.name for item in page.inputs if item.type == "None"}
    assert hidden == set(HIDDEN_ENUMS)
    properties = components["Input"]["properties"]
    for name in sorted(hidden):
        assert enum_choices(properties[name], components) == HIDDEN_ENUMS[name], name


@pytest.mark.parametrize("prefix", CANONICAL_PAGES)
def test_canonical_page_output_matches_schema(prefix: str, components: dict[str, Any]) -> None:
    assert components["Output"] == load_page(prefix).output


def test_canonical_pages_agree() -> None:
    """Both layouts (table in 000/004, lines in 002) parse to the same contract."""
    first, *others = (load_page(prefix) for prefix in CANONICAL_PAGES)
    for other in others:
        assert other == first


def test_hidden_enum_choices(components: dict[str, Any]) -> None:
    properties = components["Input"]["properties"]
    for name, choices in HIDDEN_ENUMS.items():
        assert property_as_seed_input(name, properties[name], components).type == "None", name
        assert enum_choices(properties[name], components) == choices, name


def test_only_prompt_is_required(components: dict[str, Any]) -> None:
    assert components["Input"]["required"] == ["prompt"]


def test_variant_pages_parse() -> None:
    """001 and 003 are other schema variants: check the parser finds their inputs."""
    ascii_art = load_page("001")
    assert len(ascii_art.inputs) == 18
    assert "go_fast" not in ascii_art.names
    assert ascii_art.names[4:6] == ["width", "height"]
    assert ascii_art.input("aspect_ratio").type == "string (enum)"
    assert ascii_art.input("aspect_ratio").options == HIDDEN_ENUMS["aspect_ratio"]
    assert ascii_art.input("lora_scale") == SeedInput(
        name="lora_scale",
        type="number",
        default="1",
        minimum=-1,
        maximum=2,
        description="Determines how strongly the main LoRA should be applied. Sane results between 0 and 1.",
    )

    film_foto = load_page("003")
    assert len(film_foto.inputs) == 20
    assert "replicate_weights" not in film_foto.names
    assert film_foto.input("go_fast").default == "True"
    assert film_foto.input("megapixels").options == ["1", "0.25"]
    assert film_foto.input("output_format").options == ["webp", "jpg", "png"]
    for page in (ascii_art, film_foto):
        assert page.output == {
            "items": {"format": "uri", "type": "string"},
            "title": "Output",
            "type": "array",
        }


def variant_schema(class_name: str) -> dict[str, Any]:
    return json.loads((REPO_ROOT / ".cog" / "schemas" / f"{class_name}.json").read_text(encoding="utf-8"))


@pytest.mark.parametrize(("prefix", "class_name"), VARIANT_PAGES.items())
def test_variant_page_inputs_match_its_schema(prefix: str, class_name: str) -> None:
    """Names, order, types (inline enums included), defaults, bounds and descriptions."""
    schema = variant_schema(class_name)
    differences = inputs_differences(load_page(prefix), schema)
    assert not differences, f"{class_name} differs from seed page {prefix}:\n" + "\n".join(differences)


@pytest.mark.parametrize(("prefix", "class_name"), VARIANT_PAGES.items())
def test_variant_page_output_and_required_match_its_schema(prefix: str, class_name: str) -> None:
    components = variant_schema(class_name)["components"]["schemas"]
    assert components["Output"] == load_page(prefix).output
    assert components["Input"]["required"] == ["prompt"]


@pytest.mark.parametrize(("prefix", "class_name"), VARIANT_PAGES.items())
def test_variant_pages_show_every_choice_inline(prefix: str, class_name: str) -> None:
    """Those pages show no `None` type: every enum is inline, and no enum component is left over."""
    page = load_page(prefix)
    assert all(item.type != "None" for item in page.inputs)
    components = variant_schema(class_name)["components"]["schemas"]
    assert not any("enum" in schema for schema in components.values())
    inline = {name for name, prop in components["Input"]["properties"].items() if "enum" in prop}
    assert inline == {item.name for item in page.inputs if item.options is not None}


def test_variant_pages_differ_from_the_canonical_one() -> None:
    """What sets 001 and 003 apart from 000, so that a regression to the canonical form shows."""
    canonical = load_page("000")
    first, go_fast = load_page("001"), load_page("003")
    assert set(canonical.names) - set(first.names) == {"go_fast", "megapixels", "replicate_weights"}
    assert set(canonical.names) - set(go_fast.names) == {"replicate_weights"}
    assert first.input("guidance_scale").default == "3.5"
    assert first.input("output_quality").default == "90"
    assert (first.input("lora_scale").maximum, first.input("extra_lora_scale").maximum) == (2, 2)
    assert go_fast.input("go_fast").default == "True"


TABLE_PAGE = """\
Input schema
| Field | Type | Default value | Description |
|---|---|---|---|
| seed |
    integer
   |
    Random seed.
   | |
| scale |
    number
   |
      1.5
     Max: 3 |
    How much.
   |
Output schema
{'type': 'string'}"""

LINES_PAGE = """\
Input schema

Field Type Default value Description
seed
integer
Random seed.
scale
number
1.5

Max: 3

How much.

Output schema

Schema
{'type': 'string'}"""


def test_parser_reads_both_layouts() -> None:
    expected = SeedPage(
        inputs=[
            SeedInput(name="seed", type="integer", description="Random seed."),
            SeedInput(name="scale", type="number", default="1.5", maximum=3, description="How much."),
        ],
        output={"type": "string"},
    )
    assert parse_seed_page(TABLE_PAGE) == expected
    assert parse_seed_page(LINES_PAGE) == expected


def test_schema_rendering_follows_page_conventions() -> None:
    prop = {"type": "number", "default": 3.0, "minimum": 0, "maximum": 10.0, "description": "d"}
    assert property_as_seed_input("g", prop, {}) == SeedInput("g", "number", "3", None, 10, "d")
    flag = {"type": "boolean", "default": False, "description": "f"}
    assert property_as_seed_input("b", flag, {}).default == "False"
    uri = {"type": "string", "format": "uri", "nullable": True, "description": "u"}
    assert property_as_seed_input("u", uri, {}).type == "string"
    inline = {"type": "string", "enum": ["1", "0.25"], "default": "1", "description": "m"}
    assert property_as_seed_input("m", inline, {}) == SeedInput(
        "m", "string (enum)", "1", description="m", options=["1", "0.25"]
    )


def _set(name: str, key: str, value: Any) -> Callable[[dict[str, Any]], None]:
    def mutate(openapi: dict[str, Any]) -> None:
        openapi["components"]["schemas"]["Input"]["properties"][name][key] = value

    return mutate


def _swap_order(openapi: dict[str, Any]) -> None:
    properties = openapi["components"]["schemas"]["Input"]["properties"]
    properties["height"]["x-order"], properties["width"]["x-order"] = 5, 4


def _inline_enum(openapi: dict[str, Any]) -> None:
    prop = openapi["components"]["schemas"]["Input"]["properties"]["megapixels"]
    del prop["allOf"]
    prop.update(type="string", enum=["1", "0.25"])


def _drop(openapi: dict[str, Any]) -> None:
    del openapi["components"]["schemas"]["Input"]["properties"]["go_fast"]


@pytest.mark.parametrize(
    ("mutate", "reported"),
    [
        (_set("seed", "description", "Random seed. Set for reproducible generation."), "seed.description"),
        (_set("guidance_scale", "default", 3.5), "guidance_scale.default"),
        (_set("lora_scale", "maximum", 2), "lora_scale.maximum"),
        (_set("num_outputs", "minimum", 0), "num_outputs.minimum"),
        (_set("height", "minimum", 0), "height.minimum"),
        (_inline_enum, "megapixels.type"),
        (_swap_order, "height.x-order"),
        (_drop, "go_fast: on the page, missing from the schema"),
    ],
    ids=["description", "default", "maximum", "min-1-to-0", "min-256-to-0", "type", "order", "missing"],
)
def test_changed_schema_is_reported(
    mutate: Callable[[dict[str, Any]], None], reported: str, openapi: dict[str, Any]
) -> None:
    page = load_page("000")
    changed = copy.deepcopy(openapi)
    mutate(changed)
    differences = inputs_differences(page, changed)
    assert any(line.startswith(reported) for line in differences), differences
