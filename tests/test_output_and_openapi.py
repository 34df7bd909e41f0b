import json
import os
import shutil
import signal
import subprocess
import sys

import pytest
from PIL import Image

from flux_lora.__main__ import main
from flux_lora.dev import openapi
from flux_lora.dev.client import failure_text, parse_inputs
from flux_lora.dev.cog_server import CogServer
from flux_lora.models.layout import REPO_ROOT
from flux_lora.output import OUTPUT_ROOT_PREFIX, new_output_root, save_images

PREDICTORS = ["Predictor", "FirstReleasePredictor", "GoFastPredictor"]


def test_files_are_named_out_n(tmp_path):
    images = [Image.new("RGB", (32, 32), (i * 60, 0, 0)) for i in range(3)]
    paths = save_images(images, tmp_path, "jpg", 80)
    assert [p.name for p in paths] == ["out-0.jpg", "out-1.jpg", "out-2.jpg"]
    assert Image.open(paths[2]).format == "JPEG"


def test_a_server_start_removes_the_output_folders_of_servers_that_were_stopped(tmp_path):
    """coglet stops its worker with SIGTERM, which runs no cleanup: the next start removes the
    folder (and the last prediction's files in it); folders of live processes stay."""
    stopped = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from pathlib import Path; from flux_lora.output import new_output_root; "
            "root = new_output_root(Path(sys.argv[1])); (root / 'out-0.webp').write_bytes(b'x'); "
            "print(root, flush=True); time.sleep(60)",
            str(tmp_path),
        ],
        cwd=REPO_ROOT,
        stdout=subprocess.PIPE,
        text=True,
    )
    stopped_root = tmp_path / os.path.basename(stopped.stdout.readline().strip())
    assert (stopped_root / "out-0.webp").is_file()
    stopped.send_signal(signal.SIGTERM)
    stopped.wait(timeout=10)
    assert stopped_root.is_dir()  # nothing ran at exit
    alive = tmp_path / f"{OUTPUT_ROOT_PREFIX}{os.getppid()}-abc"
    without_pid = tmp_path / f"{OUTPUT_ROOT_PREFIX}k3x9a2"  # as servers named them before
    for folder in (alive, without_pid):
        folder.mkdir()

    root = new_output_root(tmp_path)

    assert root.name.startswith(f"{OUTPUT_ROOT_PREFIX}{os.getpid()}-") and root.is_dir()
    assert not stopped_root.exists()
    assert alive.is_dir() and without_pid.is_dir()


def test_predict_py_holds_the_canonical_predictor_and_two_variants():
    assert openapi.predictor_classes("predict") == PREDICTORS


@pytest.mark.parametrize("class_name", PREDICTORS)
def test_committed_schema_equals_a_fresh_generation(class_name):
    committed = (REPO_ROOT / openapi.schema_path(class_name)).read_text()
    assert openapi.render(openapi.build_schema("predict", class_name)) == committed


def test_schema_paths():
    assert openapi.schema_path("Predictor") == openapi.SCHEMA_PATH
    assert str(openapi.schema_path("GoFastPredictor")) == ".cog/schemas/GoFastPredictor.json"
    assert openapi.schema_file("predict.py:FirstReleasePredictor", REPO_ROOT) == (
        REPO_ROOT / ".cog" / "schemas" / "FirstReleasePredictor.json"
    )
    assert openapi.schema_file("predict.py", REPO_ROOT) == REPO_ROOT / ".cog" / "openapi_schema.json"


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


def test_client_suggests_the_nearest_input_for_an_unknown_name():
    schema = json.loads((REPO_ROOT / openapi.SCHEMA_PATH).read_text())
    with pytest.raises(
        SystemExit, match=r"-i num_output: unknown input; did you mean num_outputs\? known inputs: prompt"
    ):
        parse_inputs(["num_output=2"], schema)


def test_client_says_each_failure_once_from_the_servers_own_answers(server: CogServer):
    """The bodies a real server sends: a failed prediction (coglet frames our message with two
    "Prediction failed: " and the error's type) and a 422 (coglet's list of refused fields)."""
    schema = json.loads((REPO_ROOT / openapi.SCHEMA_PATH).read_text())
    status, failed = server.predict({"prompt": "a cat", "image": "data:image/png;base64,aGVsbG8="})
    assert status == 200 and failed["status"] == "failed"
    assert failed["error"].startswith("Prediction failed: Prediction failed: InputError: image: ")
    text = failure_text(failed, schema)
    assert text.startswith("image: the 5 bytes received (they begin b'hello') are not an image"), text
    assert "Prediction failed" not in text and "InputError" not in text
    status, refused = server.predict({"prompt": "a cat", "num_outputs": 9, "guidance_scale": -1})
    assert status == 422
    text = failure_text(refused, schema)
    assert "num_outputs: 9 is greater than the maximum of 4; num_outputs takes 1 to 4" in text, text
    assert "guidance_scale: " in text and "guidance_scale takes 0 to 10" in text, text
    assert "[{" not in text and "'loc'" not in text


def test_variants_write_choices_inline():
    schema = openapi.build_schema("predict", "GoFastPredictor")
    components = schema["components"]["schemas"]
    assert components["Input"]["properties"]["megapixels"] == {
        "x-order": 16,
        "title": "Megapixels",
        "type": "string",
        "enum": ["1", "0.25"],
        "default": "1",
        "description": "Approximate number of megapixels for generated image",
    }
    assert "megapixels" not in components
    canonical = openapi.build_schema("predict", "Predictor")["components"]["schemas"]
    assert canonical["megapixels"]["enum"] == ["1", "0.25"]


def test_client_types_inputs_from_a_variants_schema():
    schema = json.loads((REPO_ROOT / openapi.schema_path("FirstReleasePredictor")).read_text())
    inputs = parse_inputs(["aspect_ratio=16:9", "guidance_scale=3.5", "width=512"], schema)
    assert inputs == {"aspect_ratio": "16:9", "guidance_scale": 3.5, "width": 512}
    with pytest.raises(SystemExit, match="go_fast: unknown input"):
        parse_inputs(["go_fast=true"], schema)


def test_openapi_command_writes_and_checks_every_schema(tmp_path, capsys, monkeypatch):
    """One command for all predictors of a file; --check names each stale, missing or stray file."""
    import predict  # noqa: F401  (restored below: the command imports the copy as `predict`)

    monkeypatch.setattr(sys, "path", list(sys.path))
    monkeypatch.delitem(sys.modules, "predict")
    shutil.copy(REPO_ROOT / "predict.py", tmp_path / "predict.py")
    predictor = str(tmp_path / "predict.py")
    assert main(["openapi", "--check", "--predictor", predictor]) == 1
    assert main(["openapi", "--predictor", predictor]) == 0
    for name in PREDICTORS:
        assert (tmp_path / openapi.schema_path(name)).read_text() == (
            REPO_ROOT / openapi.schema_path(name)
        ).read_text()
    assert main(["openapi", "--check", "--predictor", predictor]) == 0

    (tmp_path / openapi.schema_path("GoFastPredictor")).write_text("{}")
    (tmp_path / openapi.VARIANT_SCHEMA_DIR / "Gone.json").write_text("{}")
    capsys.readouterr()
    assert main(["openapi", "--check", "--predictor", predictor]) == 1
    error = capsys.readouterr().err
    assert "GoFastPredictor.json is out of date" in error
    assert "Gone.json belongs to no predictor" in error
    assert "FirstReleasePredictor" not in error
    assert main(["openapi", "--check", "--predictor", f"{predictor}:FirstReleasePredictor"]) == 0
