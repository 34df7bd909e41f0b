"""The variants of predict.py (model pages 001 and 003) through the real Cog server, on the tiny model.

Each variant is served the way `scripts/serve --predictor ...` serves it: coglet in a temporary
working folder whose `.cog/openapi_schema.json` is the variant's committed schema.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import json
import os
import signal
import subprocess
import textwrap
import urllib.error
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import predict
from flux_lora.dev import openapi
from flux_lora.dev.cog_server import CogServer, free_port
from flux_lora.models.layout import REPO_ROOT
from flux_lora.schema import GenerationRequest
from tests.conftest import NO_SERVICES, open_image, output_images, predict_ok

FIRST_RELEASE = "predict.py:FirstReleasePredictor"
GO_FAST = "predict.py:GoFastPredictor"
SMALL = {"aspect_ratio": "custom", "width": 256, "height": 256, "num_inference_steps": 1}

SLOW = pytest.mark.slow  # a script's own server: the default tier keeps one of these


def committed_schema(class_name: str) -> dict[str, Any]:
    return json.loads((REPO_ROOT / openapi.schema_path(class_name)).read_text())


def properties(class_name: str) -> dict[str, Any]:
    return committed_schema(class_name)["components"]["schemas"]["Input"]["properties"]


def schema_defaults(class_name: str) -> dict[str, Any]:
    """Every input the schema gives a default, at that default: what a page's defaults send."""
    return {name: prop["default"] for name, prop in properties(class_name).items() if "default" in prop}


# --- predict.py: declarations only ------------------------------------------------------------


@pytest.mark.parametrize("class_name", openapi.predictor_classes("predict"))
def test_each_run_is_declarations_and_one_call(class_name: str):
    source = textwrap.dedent(inspect.getsource(getattr(predict, class_name).run))
    (function,) = ast.parse(source).body
    assert [ast.unparse(statement) for statement in function.body] == ["return self._predict(locals())"]


@pytest.mark.parametrize("class_name", ["FirstReleasePredictor", "GoFastPredictor"])
def test_inputs_a_variant_lacks_take_the_canonical_defaults(class_name: str):
    canonical = properties("Predictor")
    missing = set(canonical) - set(properties(class_name))
    assert missing, class_name
    request_defaults = {field.name: field.default for field in dataclasses.fields(GenerationRequest)}
    for name in missing:
        assert request_defaults[name] == canonical[name].get("default"), name
    expected = {"go_fast": False, "megapixels": "1", "replicate_weights": None}
    assert {name: request_defaults[name] for name in missing} == {name: expected[name] for name in missing}


# --- through the server -----------------------------------------------------------------------


def serve(predictor: str, folder: Path, tiny_model_dir: Path) -> CogServer:
    env = {"FLUX_MODEL_DIR": str(tiny_model_dir), "FLUX_LORA_CACHE_DIR": str(folder / "cache"), **NO_SERVICES}
    server = CogServer(predictor=predictor, env=env, log_path=folder / "coglet.log")
    try:
        health = server.start()
        assert health["status"] == "READY", health
    except BaseException:
        server.stop()
        raise
    return server


@pytest.fixture(scope="module")
def first_release(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[CogServer]:
    with serve(FIRST_RELEASE, tmp_path_factory.mktemp("first-release"), tiny_model_dir) as server:
        yield server


@pytest.fixture(scope="module")
def go_fast(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[CogServer]:
    with serve(GO_FAST, tmp_path_factory.mktemp("go-fast"), tiny_model_dir) as server:
        yield server


@pytest.fixture(params=["first_release", "go_fast"])
def variant(request: pytest.FixtureRequest) -> tuple[str, CogServer]:
    """(class name, its server), for tests that hold for both variants."""
    server = request.getfixturevalue(request.param)
    return server.predictor.partition(":")[2], server


def test_the_variant_runs_in_a_working_folder_holding_its_schema(variant):
    class_name, server = variant
    link = server.workdir / ".cog" / "openapi_schema.json"
    assert link.resolve() == REPO_ROOT / openapi.schema_path(class_name)
    assert server.workdir != REPO_ROOT


def test_openapi_served_is_the_variants_committed_schema(variant):
    class_name, server = variant
    assert server.get("/openapi.json") == committed_schema(class_name)


def test_a_request_at_the_pages_defaults_succeeds(variant):
    """Every default as the page shows it, sent explicitly; one step, and 0.25 megapixels where offered."""
    class_name, server = variant
    inputs = {**schema_defaults(class_name), "prompt": "a cat", "num_inference_steps": 1, "seed": 3}
    if "megapixels" in inputs:
        inputs["megapixels"] = "0.25"
    [(mime, data)] = output_images(predict_ok(server, **inputs))
    assert mime == "image/webp"
    side = 512 if "megapixels" in inputs else 1024
    assert open_image(data).size == (side, side)


def test_first_release_ignores_the_inputs_it_lacks(first_release: CogServer):
    """coglet strips input names the schema does not know (and logs a warning): go_fast,
    megapixels and replicate_weights (a reference that would fail to fetch) change nothing."""
    common = {"prompt": "a cat", "num_inference_steps": 1, "seed": 5}
    plain = predict_ok(first_release, **common)
    extras = {"go_fast": True, "megapixels": "0.25", "replicate_weights": "owner/model"}
    body = predict_ok(first_release, **common, **extras)
    assert "go_fast:" not in body["logs"]
    assert output_images(body) == output_images(plain)
    assert open_image(output_images(body)[0][1]).size == (1024, 1024)  # not 0.25 megapixels
    stripped = [
        json.loads(line)["fields"]
        for line in first_release.log_path.read_text().splitlines()
        if "Stripped unknown input fields" in line
    ]
    assert any(all(name in entry["fields"] for name in extras) for entry in stripped), stripped


def test_go_fast_variant_ignores_replicate_weights(go_fast: CogServer):
    body = predict_ok(go_fast, prompt="a cat", replicate_weights="owner/model", seed=5, **SMALL)
    assert "replicate_weights" in go_fast.log_path.read_text()  # the "Stripped unknown input fields" line
    assert output_images(body) == output_images(predict_ok(go_fast, prompt="a cat", seed=5, **SMALL))


@pytest.mark.parametrize("name", ["lora_scale", "extra_lora_scale"])
def test_lora_scales_above_2_are_422_for_the_first_release_only(
    name: str, first_release: CogServer, go_fast: CogServer, server: CogServer
):
    status, body = first_release.predict({"prompt": "a cat", name: 2.5})
    assert status == 422, body
    assert any(name in detail["loc"] for detail in body["detail"]), body
    predict_ok(first_release, prompt="a cat", **{name: 2}, **SMALL)
    predict_ok(go_fast, prompt="a cat", **{name: 2.5}, **SMALL)
    predict_ok(server, prompt="a cat", **{name: 2.5}, **SMALL)


@pytest.mark.parametrize(
    ("fixture", "name", "value"),
    [
        ("first_release", "aspect_ratio", "7:3"),
        ("first_release", "model", "pro"),
        ("first_release", "output_format", "gif"),
        ("first_release", "output_quality", 101),
        ("go_fast", "megapixels", "2"),
        ("go_fast", "aspect_ratio", "7:3"),
        ("go_fast", "go_fast", "yes"),
    ],
)
def test_inline_choices_and_bounds_are_validated(request: pytest.FixtureRequest, fixture, name, value):
    status, body = request.getfixturevalue(fixture).predict({"prompt": "a cat", name: value})
    assert status == 422, body
    assert any(name in detail["loc"] for detail in body["detail"]), body


def test_go_fast_is_on_by_default_for_the_go_fast_variant(go_fast: CogServer):
    assert "go_fast:" in predict_ok(go_fast, prompt="a cat", **SMALL)["logs"]
    assert "go_fast:" not in predict_ok(go_fast, prompt="a cat", go_fast=False, **SMALL)["logs"]


def test_first_release_guidance_default_is_3_5(first_release: CogServer):
    def image(**inputs: Any) -> bytes:
        body = predict_ok(first_release, prompt="a cat", seed=11, output_format="png", **SMALL, **inputs)
        return output_images(body)[0][1]

    default = image()
    assert default == image(guidance_scale=3.5)
    assert default != image(guidance_scale=3)


def test_first_release_output_quality_default_is_90(first_release: CogServer):
    def image(**inputs: Any) -> bytes:
        return output_images(predict_ok(first_release, prompt="a cat", seed=11, **SMALL, **inputs))[0][1]

    default = image()
    assert default == image(output_quality=90)
    assert default != image(output_quality=80)


@pytest.mark.skipif(
    (REPO_ROOT / "weights" / "FLUX.1-dev" / "model_index.json").is_file(),
    reason="FLUX weights in weights/: this test would load them",
)
def test_a_variant_looks_for_weights_beside_the_repositorys_package(tmp_path):
    """Run from its temporary folder, the worker still imports the repository's `flux_lora`, whose
    models/layout.py finds the default `weights/` from its own file (setup then says what it found)."""
    env = {"FLUX_LORA_CACHE_DIR": str(tmp_path / "cache"), "HF_TOKEN": "", **NO_SERVICES}
    with CogServer(predictor=GO_FAST, env={**env, "FLUX_MODEL_DIR": ""}) as server:
        health = server.start()
    assert f"{REPO_ROOT / 'weights'}" in health["setup"]["logs"], health


# --- scripts/serve and scripts/predict ---------------------------------------------------------


def script_env(tiny_model_dir: Path, tmp_path: Path, **more: str) -> dict[str, str]:
    (tmp_path / "tmp").mkdir(exist_ok=True)
    return {
        **os.environ,
        "FLUX_MODEL_DIR": str(tiny_model_dir),
        "FLUX_LORA_CACHE_DIR": str(tmp_path / "cache"),
        "TMPDIR": str(tmp_path / "tmp"),  # where the working folder goes: checked for removal below
        **NO_SERVICES,
        **more,
    }


def wait_ready(server: CogServer, process: subprocess.Popen, timeout: float = 180) -> None:
    server.process = process  # so that wait_for_setup notices an early exit
    try:
        assert server.wait_for_setup(timeout)["status"] == "READY"
    finally:
        server.process = None


@pytest.mark.parametrize(
    ("args", "stub", "class_name", "signum"),
    [
        pytest.param(
            ["--predictor", FIRST_RELEASE], None, "FirstReleasePredictor", signal.SIGTERM, marks=SLOW
        ),
        pytest.param([], GO_FAST, "GoFastPredictor", signal.SIGINT, marks=SLOW),
        ([], None, "Predictor", signal.SIGHUP),
    ],
    ids=["--predictor", "COG_PREDICT_TYPE_STUB", "default"],
)
def test_scripts_serve_serves_the_chosen_predictor(tiny_model_dir, tmp_path, args, stub, class_name, signum):
    """Until a signal (Ctrl-C, SIGTERM, a closed terminal) stops coglet and removes its folder."""
    port = free_port()
    env = script_env(tiny_model_dir, tmp_path, PORT=str(port))
    env.pop("COG_PREDICT_TYPE_STUB", None)
    if stub:
        env["COG_PREDICT_TYPE_STUB"] = stub
    log = open(tmp_path / "serve.log", "wb")  # noqa: SIM115
    process = subprocess.Popen(
        [str(REPO_ROOT / "scripts" / "serve"), *args], env=env, stdout=log, stderr=subprocess.STDOUT
    )
    try:
        client = CogServer(port=port)
        wait_ready(client, process)
        assert client.get("/openapi.json") == committed_schema(class_name)
        if class_name != "Predictor":
            assert list((tmp_path / "tmp").glob("cog-*")), "no temporary working folder"
    finally:
        process.send_signal(signum)
        assert process.wait(timeout=30) == 128 + signum
        log.close()
    # coglet is gone with it, and so is the working folder.
    with pytest.raises(urllib.error.URLError):
        CogServer(port=port).get("/health-check")
    assert not list((tmp_path / "tmp").glob("cog-*"))


@pytest.mark.slow
def test_scripts_predict_with_a_variant(tiny_model_dir, tmp_path):
    def run(*inputs: str) -> subprocess.CompletedProcess:
        command = [str(REPO_ROOT / "scripts" / "predict"), "--predictor", FIRST_RELEASE, "-o", str(tmp_path)]
        for pair in inputs:
            command += ["-i", pair]
        env = script_env(tiny_model_dir, tmp_path)
        return subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)

    done = run("prompt=a cat", "num_inference_steps=1", "aspect_ratio=custom", "width=256", "height=256")
    assert done.returncode == 0, done.stderr
    assert open_image((tmp_path / "out-0.webp").read_bytes()).size == (256, 256)

    refused = run("prompt=a cat", "go_fast=true")  # typed by the variant's schema: refused before serving
    assert refused.returncode != 0
    assert "go_fast: unknown input" in refused.stderr
