"""Compiled transformers: LoRA slots give what peft's adapters give, swaps never recompile, and a
compiled server serves every mode and LoRA change with no compilation after setup.

torch.compile runs with the `eager` backend here: dynamo traces, guards and recompiles exactly as
with inductor, without inductor's code generation (minutes on this CPU).
"""

from __future__ import annotations

import base64
import copy
import re
from collections.abc import Iterator
from pathlib import Path

import pytest
import safetensors.torch
import torch
from diffusers import FluxTransformer2DModel
from PIL import Image

from flux_lora.dev.cog_server import CogServer
from flux_lora.device import inventory, quant
from flux_lora.device.compilation import Compiler, CompileSettings
from flux_lora.device.quant import transformer_inputs
from flux_lora.errors import InputError
from flux_lora.lora.adapters import AdapterSet, WantedAdapter
from flux_lora.lora.slots import LoraSlots
from flux_lora.models.layout import ModelSource
from flux_lora.pipeline import FluxPipelines
from flux_lora.schema import GenerationRequest
from flux_lora.testing import tiny
from tests.conftest import NO_SERVICES, becomes_ready, image_data_uri, output_images, predict_ok
from tests.device import fp8_matmuls

MAX_RANK = 8
FAST = {"num_inference_steps": 2, "megapixels": "0.25", "seed": 3}

# torch.compile (eager backend) on the CPU: the compiled path serves CUDA GPUs only, and
# compiling takes seconds a test, so the whole module is in the slow tier.
pytestmark = pytest.mark.slow


def write_lora(path: Path, tensors: dict[str, torch.Tensor]) -> str:
    safetensors.torch.save_file(tensors, path)
    return str(path)


def random_tensors(seed: int, rank: int) -> dict[str, torch.Tensor]:
    return safetensors.torch.load(tiny.random_lora(seed=seed, rank=rank))


@pytest.fixture(scope="module")
def loras(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    folder = tmp_path_factory.mktemp("loras")
    plain = random_tensors(1, 4)
    with_alphas = dict(random_tensors(2, 4))
    for key in [k for k in with_alphas if k.endswith(".lora_A.weight")][::2]:  # half the layers
        with_alphas[key.replace(".lora_A.weight", ".alpha")] = torch.tensor(2.0)
    mixed = dict(random_tensors(3, 4))
    mixed.update({k: v for k, v in random_tensors(4, 6).items() if ".single_transformer_blocks." in k})
    return {
        "plain": write_lora(folder / "plain.safetensors", plain),
        "alphas": write_lora(folder / "alphas.safetensors", with_alphas),
        "mixed ranks": write_lora(folder / "mixed.safetensors", mixed),
        "rank 16": write_lora(folder / "rank16.safetensors", random_tensors(5, 16)),
        # One layer's lora_B left out: the slots once applied the rest and dropped it silently.
        # (Sorted: safetensors.torch.load's key order changes from call to call.)
        "half": write_lora(folder / "half.safetensors", dict(sorted(random_tensors(6, 4).items())[:-1])),
        "sdxl": write_lora(
            folder / "sdxl.safetensors",
            {
                "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight": torch.randn(
                    4, 640
                ),
                "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q.lora_B.weight": torch.randn(
                    640, 4
                ),
            },
        ),
    }


def wanted(path: str, scale: float = 1.0, label: str = "replicate_weights") -> WantedAdapter:
    return WantedAdapter(identity=path, path=path, scale=scale, label=label, display=Path(path).name)


@pytest.fixture(scope="module")
def base(tiny_model_dir: Path) -> FluxTransformer2DModel:
    return FluxTransformer2DModel.from_pretrained(tiny_model_dir / "FLUX.1-dev" / "transformer")


def inputs(
    transformer, tokens: int = 64, batch: int = 1, seed: int = 0, dtype: torch.dtype = torch.float32
) -> dict[str, torch.Tensor]:
    return transformer_inputs(
        transformer, torch.device("cpu"), dtype, tokens=tokens, text=12, batch=batch, seed=seed
    )


def run(transformer, **kwargs) -> torch.Tensor:
    with torch.inference_mode():
        return transformer(**inputs(transformer, **kwargs)).sample


class Compiled:
    def __init__(self, base: FluxTransformer2DModel):
        self.transformer = copy.deepcopy(base)
        self.slots = LoraSlots.install(self.transformer, MAX_RANK)
        self.compiler = Compiler(
            CompileSettings(enabled=True, backend="eager", cache_dir=None), torch.device("cpu")
        )
        self.compiler.compile(self.transformer)


@pytest.fixture
def compiled(base) -> Iterator[Compiled]:
    torch._dynamo.reset()
    yield Compiled(base)
    torch._dynamo.reset()


def test_empty_slots_add_nothing(base, compiled: Compiled):
    # Not bit-equal: a deep copy alone changes the last bit here (seen: 4.8e-07), as the CPU
    # kernels' summation order follows the weights' memory alignment. Exactness is checked on
    # one module, before and after a swap, below.
    torch.testing.assert_close(run(compiled.transformer), run(base), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["plain", "alphas", "mixed ranks"])
def test_a_slot_gives_what_peft_gives(base, compiled: Compiled, loras, kind: str):
    reference = copy.deepcopy(base)
    AdapterSet(reference).activate([wanted(loras[kind], 0.7)], multiplier=1.5)
    compiled.slots.activate([wanted(loras[kind], 0.7)], multiplier=1.5)
    expected = run(reference)
    assert not torch.allclose(expected, run(base), atol=1e-3)  # the LoRA does something
    torch.testing.assert_close(run(compiled.transformer), expected, rtol=1e-3, atol=1e-4)


def test_two_slots_give_what_two_peft_adapters_give(base, compiled: Compiled, loras):
    pair = [wanted(loras["plain"], 0.8), wanted(loras["alphas"], -0.5, "extra_lora")]
    reference = copy.deepcopy(base)
    AdapterSet(reference).activate(pair)
    compiled.slots.activate(pair)
    torch.testing.assert_close(run(compiled.transformer), run(reference), rtol=1e-3, atol=1e-4)


def test_swaps_scales_sizes_and_batches_never_recompile(compiled: Compiled, loras):
    pristine = run(compiled.transformer, tokens=64)
    # One graph per block class (double, single), for every block, batch and size.
    assert compiled.compiler.compilations == 2
    run(compiled.transformer, tokens=64, batch=2)
    graphs = compiled.compiler.compilations
    assert graphs == 2
    for step in [
        [wanted(loras["plain"])],
        [wanted(loras["plain"], 0.3)],
        [wanted(loras["mixed ranks"]), wanted(loras["alphas"], 1.0, "extra_lora")],
        [],
        [wanted(loras["alphas"], 2.0)],
    ]:
        compiled.slots.activate(step)
        for tokens, batch in [(64, 1), (96, 1), (160, 3), (1, 1)]:  # 1: a 16x16 img2img input
            run(compiled.transformer, tokens=tokens, batch=batch)
    assert compiled.compiler.compilations == graphs
    compiled.slots.activate([])
    assert torch.equal(run(compiled.transformer), pristine)  # cleared slots: exactly as before


def test_the_counter_sees_a_recompile(compiled: Compiled):
    """The check above could not fail if the counter missed recompiles: a new dtype must count."""
    run(compiled.transformer)
    before = compiled.compiler.compilations
    with torch.inference_mode():
        compiled.transformer.to(torch.float64)(
            **{k: v.double() for k, v in inputs(compiled.transformer).items()}
        )
    assert compiled.compiler.compilations > before


@pytest.mark.parametrize(
    ("kind", "message"),
    [
        ("sdxl", r"no key matches a FLUX transformer layer"),
        (
            "half",
            r"is not a whole LoRA: transformer.transformer_blocks.0.ff_context.net.0.proj has its down matrix and not its up",
        ),
    ],
)
def test_a_lora_that_cannot_fit_changes_nothing(base, compiled: Compiled, loras, kind: str, message: str):
    compiled.slots.activate([wanted(loras["plain"])])
    before = run(compiled.transformer)
    with pytest.raises(InputError, match=message):
        compiled.slots.activate([wanted(loras[kind])])
    assert compiled.slots.held["main"] == (loras["plain"], 1.0)
    assert torch.equal(run(compiled.transformer), before)


# go_fast on H100s and H200s: fp8 matmuls, run on this CPU (tests/device/fp8_matmuls.py).


@pytest.fixture
def fp8_matmuls_here(monkeypatch: pytest.MonkeyPatch) -> None:
    fp8_matmuls.lift_hardware_checks(monkeypatch.setattr)


@pytest.mark.parametrize("scaling", ["PerRow", "PerTensor"])
def test_fp8_matmuls_take_two_graphs_a_block_class(base, fp8_matmuls_here, scaling: str):
    """Both scalings a GPU may pick (the H200 fell back to per-tensor). torchao works out an
    activation's scales in Python that branches on a batch of one, so a batch of one and larger
    ones get a graph each; with the batch unbacked it broke each block into pieces."""
    import torchao.quantization as ao

    torch._dynamo.reset()
    fast = quant._base_copy(copy.deepcopy(base).to(torch.bfloat16))
    ao.quantize_(fast, ao.Float8DynamicActivationFloat8WeightConfig(granularity=getattr(ao, scaling)()))
    uncompiled = copy.deepcopy(fast)
    compiler = Compiler(CompileSettings(enabled=True, backend="eager", cache_dir=None), torch.device("cpu"))
    compiler.compile(fast, unbacked_batch=False)
    for tokens, batch in [(64, 1), (64, 2), (96, 3), (160, 1), (1, 1)]:
        step = dict(tokens=tokens, batch=batch, dtype=torch.bfloat16)
        torch.testing.assert_close(run(fast, **step), run(uncompiled, **step), rtol=0, atol=0)
    assert compiler.compilations == 4
    torch._dynamo.reset()


def test_fp8_matmuls_are_compiled_at_setup_for_every_request(
    tiny_model_dir, monkeypatch, fp8_matmuls_here, loras
):
    """A GPU's compiled start, in bf16: one graph per block class for bf16, two for the fp8
    matmuls, and then requests of other sizes and batches, img2img from 16x16 and a LoRA swap
    compile nothing, and every module keeps its dtype. Before the fp8 copies kept their batch
    backed, setup made 25 compilations here."""
    monkeypatch.setenv("FLUX_LORA_DTYPE", "bfloat16")
    torch._dynamo.reset()
    cpu = torch.device("cpu")
    pipelines = FluxPipelines.load(ModelSource(tiny_model_dir), cpu)
    compiler = Compiler(CompileSettings(enabled=True, backend="eager", cache_dir=None), cpu)
    pipelines.compile_for_serving(compiler, MAX_RANK, warm_up="quick")
    assert set(pipelines.fast_modes.values()) == {fp8_matmuls.PER_ROW_MODE}
    assert compiler.compilations == 2 + 4
    side = pipelines.min_side  # one image token (16x16 at full size)
    tiny_image = Image.effect_noise((side, side), 60).convert("RGB")
    for model, size, outputs, image in [
        ("schnell", (256, 128), 3, None),
        ("dev", (side, side), 1, tiny_image),
    ]:
        pipelines.lora_slots[(model, True)].activate([wanted(loras["plain"], 0.8)])
        request = GenerationRequest(prompt="a cat", model=model, num_outputs=outputs, num_inference_steps=1)
        pipelines.generate(request, size=size, seed=1, image=image, fast=True)
    assert compiler.compilations == 6
    for name, module in inventory.held_modules(pipelines):
        assert inventory.faults(name, module, torch.bfloat16) == []
    torch._dynamo.reset()


# The whole container, compiled.


@pytest.fixture(scope="module")
def compiled_server(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[CogServer]:
    folder = tmp_path_factory.mktemp("compiled-server")
    env = {
        "FLUX_MODEL_DIR": str(tiny_model_dir),
        "FLUX_LORA_CACHE_DIR": str(folder / "cache"),
        "FLUX_LORA_COMPILE": "1",
        "FLUX_LORA_COMPILE_BACKEND": "eager",
        "FLUX_LORA_COMPILE_CACHE": str(folder / "compile-cache"),
        "FLUX_LORA_MAX_LORA_RANK": str(MAX_RANK),
        **NO_SERVICES,
    }
    with CogServer(env=env, log_path=folder / "coglet.log") as server:
        assert server.start()["status"] == "READY"
        yield server


def test_a_compiled_server_serves_every_mode_and_swap_without_compiling(compiled_server: CogServer, loras):
    setup_log = compiled_server.log_path.read_text()
    # Every size served, one and two outputs: one graph per block class, bf16 and fp8 (peft's
    # fp8 layers are another class). It was 12 when batches of one and the single blocks' views
    # had graphs of their own.
    assert "torch.compile (eager): 4 transformers warmed up on 23 shapes each, 4 compilations" in setup_log
    image = image_data_uri(Image.effect_noise((96, 64), 60).convert("RGB"))
    lora, other = (f"data:application/octet-stream;base64,{_b64(loras[k])}" for k in ("plain", "alphas"))
    requests = [
        {"go_fast": True},
        {"go_fast": True, "replicate_weights": lora},
        {"go_fast": True, "replicate_weights": other, "extra_lora": lora, "extra_lora_scale": 0.5},
        {"go_fast": False, "replicate_weights": lora, "aspect_ratio": "16:9"},
        {"model": "schnell", "go_fast": True, "num_outputs": 3, "replicate_weights": lora},
        {"image": image, "prompt_strength": 1.0, "go_fast": True, "replicate_weights": other},
        {"image": image, "mask": image, "prompt_strength": 1.0},
        {"go_fast": True},
    ]
    for extra in requests:
        body = predict_ok(compiled_server, prompt="a cat", **{**FAST, **extra})
        assert "go_fast: fp8 weight-only, compiled" in body["logs"] or not extra.get("go_fast"), body["logs"]
        assert "compilation(s) during this request" not in body["logs"], (extra, body["logs"])
        assert becomes_ready(compiled_server)


def test_a_compiled_server_takes_ranks_over_the_maximum_without_compiling(compiled_server: CogServer, loras):
    """Rank-16 layers over rank-8 slots: written into the weights exactly, or on go_fast's fp8
    weights, their best rank-8 approximation (the arithmetic of both is checked layer by layer in
    tests/lora/test_formats.py). Nothing recompiles, and the base comes back bit for bit."""
    big = f"data:application/octet-stream;base64,{_b64(loras['rank 16'])}"
    base = output_images(predict_ok(compiled_server, prompt="a cat", **FAST))
    for go_fast, said in (
        (False, r"\(FLUX_LORA_MAX_LORA_RANK\) written into the weights, exactly"),
        (True, "approximated at that rank"),
    ):
        logs = predict_ok(compiled_server, prompt="a cat", replicate_weights=big, go_fast=go_fast, **FAST)[
            "logs"
        ]
        assert re.search(rf"replicate_weights: \d+ of \d+ layers above rank 8 {said}", logs), logs
        assert "compilation(s) during this request" not in logs, logs
    assert output_images(predict_ok(compiled_server, prompt="a cat", **FAST)) == base


def _b64(path: str) -> str:
    return base64.b64encode(Path(path).read_bytes()).decode()
