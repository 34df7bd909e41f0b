import json

from PIL import Image

from flux_lora import openapi
from flux_lora.client import parse_inputs
from flux_lora.models import REPO_ROOT
from flux_lora.output import save_images


def test_files_are_named_out_n(tmp_path):
    images = [Image.new("RGB", (32, 32), (i * 60, 0, 0)) for i in range(3)]
    paths = save_images(images, tmp_path, "jpg", 80)
    assert [p.name for p in paths] == ["out-0.jpg", "out-1.jpg", "out-2.jpg"]
    assert Image.open(paths[2]).format == "JPEG"


def test_committed_schema_equals_a_fresh_generation():
    committed = (REPO_ROOT / openapi.SCHEMA_PATH).read_text()
    assert openapi.render(openapi.build_schema("predict", "Predictor")) == committed


def test_schema_follows_cogs_conventions():
    schema = openapi.build_schema("predict", "Predictor")
    inputs = schema["components"]["schemas"]["Input"]
    assert inputs["required"] == ["prompt"]
    assert inputs["properties"]["aspect_ratio"]["allOf"] == [{"$ref": "#/components/schemas/aspect_ratio"}]
    assert schema["components"]["schemas"]["megapixels"]["enum"] == ["1", "0.25"]
    assert inputs["properties"]["seed"] == {
        "x-order": 11,
        "title": "Seed",
        "type": "integer",
        "nullable": True,
        "description": "Random seed. Set for reproducible generation",
    }
    assert schema["components"]["schemas"]["Output"] == {
        "title": "Output",
        "type": "array",
        "items": {"type": "string", "format": "uri"},
    }


def test_client_types_inputs_from_the_schema(tmp_path):
    schema = json.loads((REPO_ROOT / openapi.SCHEMA_PATH).read_text())
    picture = tmp_path / "in.png"
    Image.new("RGB", (8, 8)).save(picture)
    inputs = parse_inputs(
        [
            "prompt=a=b",
            "num_outputs=2",
            "guidance_scale=2.5",
            "go_fast=true",
            "megapixels=1",
            f"image=@{picture}",
        ],
        schema,
    )
    assert inputs["prompt"] == "a=b"
    assert inputs["num_outputs"] == 2 and inputs["guidance_scale"] == 2.5
    assert inputs["go_fast"] is True and inputs["megapixels"] == "1"
    assert inputs["image"].startswith("data:image/png;base64,")
