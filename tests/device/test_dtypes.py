"""The serving dtype holds everywhere: the real server in bf16 on the CPU (FLUX_LORA_DTYPE), down
every serving path, with every module checked after each request through the inventory the server
writes (FLUX_LORA_INSPECT_FILE); `inspect --exercise --json` as a user runs it; and the rule's own
check, shown to catch the cast that diffusers' `from_pipe` made on every bf16 load.
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

import pytest
import torch

from flux_lora.dev import exercise
from flux_lora.dev.cog_server import CogServer
from flux_lora.device import inventory, quant
from flux_lora.device.choice import serving_dtype
from flux_lora.errors import ConfigError
from flux_lora.models.layout import REPO_ROOT
from flux_lora.testing import tiny
from tests.conftest import NO_SERVICES, becomes_ready, predict_ok
from tests.device import fp8_matmuls

FP8 = "float8_e4m3fn"


def lora_uri(seed: int) -> str:
    return (
        "data:application/octet-stream;base64,"
        + base64.b64encode(tiny.random_lora(seed=seed, rank=2)).decode()
    )


def check_every_module(report: dict, dtype: str = "bfloat16") -> None:
    """Every module in `dtype` (fp8 copies: fp8 weights, `dtype` for the rest), on the CPU, and
    the report's own rule finds nothing."""
    assert report["dtype"] == dtype
    assert report["faults"] == []
    for module in report["modules"]:
        floating = set(module["dtypes"]) - {"int64"}  # token position ids
        assert module["device"] == "cpu", module
        if module["name"].endswith("-fp8"):
            assert floating == {FP8, dtype}, module
            assert module["dtypes"][FP8] > module["dtypes"][dtype], module  # most values: the linear weights
        else:
            assert floating == {dtype}, module


class Served(NamedTuple):
    server: CogServer
    inspect_file: Path
    fp8_mode: str  # the go_fast mode it must serve


SERVERS = [
    "eager",
    pytest.param("compiled", marks=pytest.mark.slow),
    "eager-fp8-matmuls",
    pytest.param("compiled-fp8-matmuls", marks=pytest.mark.slow),
]


@pytest.fixture(scope="module", params=SERVERS)
def bf16_server(request, tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    """The real server in bf16, with a trained LoRA of its own (COG_WEIGHTS); compiled or not, its
    go_fast in fp8 weight-only as on any CPU, or in the fp8 matmuls of an H100 or H200 (the
    hardware checks lifted in the server's process: tests/device/fp8_matmuls.py)."""
    folder = tmp_path_factory.mktemp(f"bf16-{request.param}")
    trained = folder / "trained.safetensors"
    trained.write_bytes(tiny.random_lora(seed=9, rank=2))
    env = {
        "FLUX_MODEL_DIR": str(tiny_model_dir),
        "FLUX_LORA_CACHE_DIR": str(folder / "cache"),
        "FLUX_LORA_DTYPE": "bfloat16",
        "FLUX_LORA_INSPECT_FILE": str(folder / "inspect.json"),
        "COG_WEIGHTS": str(trained),
        **NO_SERVICES,
    }
    fp8_mode = "fp8 weight-only"
    if request.param.endswith("fp8-matmuls"):
        env["PYTHONPATH"] = str(fp8_matmuls.SITE_DIR)
        fp8_mode = fp8_matmuls.PER_ROW_MODE
    if request.param.startswith("compiled"):
        env.update(
            FLUX_LORA_COMPILE="1",
            FLUX_LORA_COMPILE_BACKEND="eager",
            FLUX_LORA_COMPILE_CACHE=str(folder / "compile-cache"),
            FLUX_LORA_WARM_UP="quick",
            FLUX_LORA_MAX_LORA_RANK="4",
        )
    with CogServer(env=env, log_path=folder / "coglet.log") as server:
        assert server.start()["status"] == "READY"
        yield Served(server, folder / "inspect.json", fp8_mode)


def test_every_path_keeps_every_module_in_bf16(bf16_server: Served):
    server, inspect_file, fp8_mode = bf16_server
    setup = json.loads(inspect_file.read_text())
    check_every_module(setup)
    compiled = setup["compile"]["enabled"]
    assert len([m for m in setup["modules"] if m["name"].endswith("-fp8")]) == (2 if compiled else 0)
    if compiled:  # a graph per block class; fp8 matmuls: one for a batch of one, one for larger
        fp8_graphs = 4 if quant.quantizes_activations(fp8_mode) else 2
        assert setup["compile"]["compilations"] == 2 + fp8_graphs
    for label, inputs in exercise.requests((lora_uri(1), lora_uri(2))):
        body = predict_ok(server, **inputs)
        assert body["output"], label
        report = json.loads(inspect_file.read_text())
        check_every_module(report)
        if inputs.get("go_fast"):
            release = "FLUX.1-dev" if inputs.get("model", "dev") == "dev" else "FLUX.1-schnell"
            assert f"{release}/transformer-fp8" in {m["name"] for m in report["modules"]}, label
        assert report["compile"]["compilations"] == setup["compile"]["compilations"], label
        assert becomes_ready(server)
    assert report["fp8"] == dict.fromkeys(("FLUX.1-dev", "FLUX.1-schnell"), fp8_mode)


def test_inspect_exercise_json_shows_every_module_in_bf16(tiny_model_dir: Path, tmp_path: Path):
    """The command docs/weights.md gives, as a user runs it."""
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith(("FLUX_", "COG_"))},
        "FLUX_MODEL_DIR": str(tiny_model_dir),
        "FLUX_LORA_CACHE_DIR": str(tmp_path / "cache"),
        "FLUX_LORA_DTYPE": "bfloat16",
        **NO_SERVICES,
    }
    done = subprocess.run(
        [sys.executable, "-m", "flux_lora", "inspect", "--exercise", "--json"],
        cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout)
    check_every_module(report)
    names = [m["name"] for m in report["modules"]]
    assert names == [
        "FLUX.1-dev/text_encoder", "FLUX.1-dev/text_encoder_2", "FLUX.1-dev/vae", "FLUX.1-dev/transformer",
        "FLUX.1-schnell/transformer", "FLUX.1-dev/transformer-fp8", "FLUX.1-schnell/transformer-fp8",
        "safety-checker", "nsfw-image-detection",
    ]  # fmt: skip
    assert len(report["exercised"]) == len(exercise.requests(("a", "b")))
    assert report["fp8"] == {"FLUX.1-dev": "fp8 weight-only", "FLUX.1-schnell": "fp8 weight-only"}
    assert report["gpu_budget_gib"] is None and report["device"] == "cpu"


def test_the_rule_catches_the_cast_from_pipe_made(tiny_model_dir: Path):
    """diffusers 0.42's `from_pipe` ends with `.to(dtype=float32)` unless told otherwise: what cast
    every bf16 load to fp32. The inventory's rule names it; our loader builds its pipelines without it."""
    from diffusers import FluxImg2ImgPipeline, FluxPipeline

    txt2img = FluxPipeline.from_pretrained(tiny_model_dir / "FLUX.1-dev", dtype=torch.bfloat16)
    assert inventory.faults("FLUX.1-dev/transformer", txt2img.transformer, torch.bfloat16) == []
    FluxImg2ImgPipeline.from_pipe(txt2img)
    found = inventory.faults("FLUX.1-dev/transformer", txt2img.transformer, torch.bfloat16)
    assert len(found) == 1 and "in float32, not bfloat16" in found[0], found


def test_the_rule_names_fp8_copies_that_are_not_fp8(tiny_model_dir: Path):
    from diffusers import FluxTransformer2DModel

    transformer = FluxTransformer2DModel.from_pretrained(tiny_model_dir / "FLUX.1-dev" / "transformer")
    found = inventory.faults("FLUX.1-dev/transformer-fp8", transformer, torch.float32)
    assert len(found) == 1 and "linear weights not in fp8" in found[0], found


def test_the_rule_names_tensors_left_on_another_device(tiny_model_dir: Path):
    from diffusers import FluxTransformer2DModel

    transformer = FluxTransformer2DModel.from_pretrained(tiny_model_dir / "FLUX.1-dev" / "transformer")
    assert inventory.faults("FLUX.1-dev/transformer", transformer, torch.float32) == []
    transformer.proj_out.to("meta")  # as a move that stopped half way would leave it
    found = inventory.faults("FLUX.1-dev/transformer", transformer, torch.float32)
    assert found == [
        "FLUX.1-dev/transformer: 2 tensor(s) on meta, apart from the rest (e.g. proj_out.weight)"
    ]


@pytest.mark.parametrize(
    ("value", "device", "expected"),
    [
        ("", "cpu", torch.float32),
        ("auto", "cpu", torch.float32),
        ("auto", "cuda", torch.bfloat16),
        (" BFloat16 ", "cpu", torch.bfloat16),
        ("float16", "cuda", torch.float16),
        ("float32", "cuda", torch.float32),
    ],
)
def test_the_serving_dtype_follows_flux_lora_dtype(monkeypatch, value: str, device: str, expected):
    monkeypatch.setenv("FLUX_LORA_DTYPE", value)
    assert serving_dtype(torch.device(device)) == expected


def test_an_unknown_dtype_is_refused_with_the_choices(monkeypatch):
    monkeypatch.setenv("FLUX_LORA_DTYPE", "bf16")
    with pytest.raises(ConfigError, match=r"FLUX_LORA_DTYPE='bf16': set auto .* bfloat16, float16, float32"):
        serving_dtype(torch.device("cpu"))
