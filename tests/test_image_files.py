"""What `cog build` puts in the image (`.dockerignore`): enough to serve, and no tooling."""

from __future__ import annotations

import shutil
from pathlib import Path

from flux_lora.dev.cog_server import CogServer
from flux_lora.dev.image_files import image_files, is_excluded
from flux_lora.models.layout import REPO_ROOT
from tests.conftest import NO_SERVICES, output_images, predict_ok

NEEDED = ("predict.py", "cog.yaml", "requirements.txt", ".cog/openapi_schema.json", "flux_lora/service.py")
TOOLING = (
    "tests/",
    "bench/",
    "scripts/",
    "demo/",
    "demo_model/",
    "docs/",
    "flux_lora/testing/",
    "flux_lora/dev/",
)


def test_the_rules_read_as_docker_reads_them():
    assert is_excluded("tests/lora/test_cache.py", ["tests"])
    assert not is_excluded("flux_lora/device/choice.py", ["flux_lora/dev"])  # whole components only
    assert is_excluded("README.md", ["*.md"]) and not is_excluded("weights/README.md", ["*.md"])
    assert is_excluded("flux_lora/lora/__pycache__/refs.pyc", ["**/__pycache__"])


def test_the_image_holds_the_server_and_no_tooling():
    files = image_files(REPO_ROOT)
    assert set(NEEDED) <= set(files)
    assert [f for f in files if f.startswith(TOOLING)] == []


def test_a_prediction_is_served_from_the_image_files_alone(tmp_path: Path, tiny_model_dir: Path):
    """Copy exactly what the image would hold and serve from it, with nothing else importable:
    a serving module that needed a test model, a dev tool or the demo code would fail setup."""
    image = tmp_path / "src"
    for name in image_files(REPO_ROOT):
        (image / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO_ROOT / name, image / name)
    env = {
        "FLUX_MODEL_DIR": str(tiny_model_dir),
        "FLUX_LORA_CACHE_DIR": str(tmp_path / "cache"),
        **NO_SERVICES,
    }
    env["PYTHONPATH"] = ""  # the server adds its own folder, the copy, and nothing else
    with CogServer(env=env, cwd=image, log_path=tmp_path / "coglet.log") as cog:
        health = cog.start()
        assert health["status"] == "READY", (tmp_path / "coglet.log").read_text()[-3000:]
        body = predict_ok(cog, prompt="a red circle", num_inference_steps=1, megapixels="0.25", seed=1)
    assert len(output_images(body)) == 1
