"""Every adapter layout and type, applied as its definition says: layer by layer through peft's
adapters (eager) and the compiled path's slots, and picture by picture through the real server.

The expected update of each layer comes from `tests/lora/formats.py`, which computes it by each
format's definition (LoKr's Kronecker product, LoHa's Hadamard product, BFL's fused rows) without
the container's converter.
"""

from __future__ import annotations

import copy
import logging
import re
from pathlib import Path

import pytest
import safetensors.torch
import torch
from diffusers import FluxTransformer2DModel

from flux_lora.dev.cog_server import CogServer, bytes_to_data_uri
from flux_lora.lora.adapters import AdapterSet, WantedAdapter
from flux_lora.lora.names import ModuleNames
from flux_lora.lora.slots import LoraSlots
from tests.conftest import output_images, predict_ok
from tests.lora.formats import LAYOUTS, Written
from tests.lora.formats import write as write_layout

SCALE = 0.6
SLOT_RANK = 8
FAST = {"num_inference_steps": 1, "megapixels": "0.25", "seed": 7, "prompt": "a cat"}


@pytest.fixture(scope="module")
def base(tiny_model_dir: Path) -> FluxTransformer2DModel:
    return FluxTransformer2DModel.from_pretrained(tiny_model_dir / "FLUX.1-dev" / "transformer")


@pytest.fixture(scope="module")
def write(base: FluxTransformer2DModel):
    """A layout's file for the tiny model, whose weights DoRA's expected updates depend on."""

    def written(layout: str, seed: int = 0) -> Written:
        return write_layout(
            layout, seed=seed, base=lambda module: base.get_submodule(module).weight.detach().float()
        )

    return written


def saved(written: Written, folder: Path, name: str = "adapter") -> str:
    path = folder / f"{name}.safetensors"
    safetensors.torch.save_file(written.tensors, path, metadata=written.header)
    return str(path)


def wanted(path: str, scale: float = SCALE, label: str = "replicate_weights") -> WantedAdapter:
    return WantedAdapter(path, path, scale, label, Path(path).name)


def delta(layer: torch.nn.Module, pristine: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """What an adapter adds to a layer's output: against the untouched model's layer, since bias
    updates are written into the layer's own bias."""
    with torch.no_grad():
        return layer(x) - pristine(x)


def expected_delta(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None) -> torch.Tensor:
    out = torch.zeros(x.shape[0], (weight if weight is not None else bias[:, None]).shape[0])
    if weight is not None:
        out += x @ weight.T
    if bias is not None:
        out += bias
    return out


def inputs_for(layer: torch.nn.Module, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    features = layer.in_features
    return torch.randn(4, features, generator=torch.Generator().manual_seed(1)).to(dtype)


def check_norms(transformer: torch.nn.Module, base: torch.nn.Module, written: Written, scale: float) -> None:
    for norm, difference in written.norms.items():
        want = base.get_submodule(norm).weight + scale * difference
        torch.testing.assert_close(transformer.get_submodule(norm).weight, want, rtol=1e-6, atol=1e-6)


def adapted(transformer: torch.nn.Module) -> set[str]:
    return {name for name, module in transformer.named_modules() if getattr(module, "lora_A", None)}


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_eager_adapters_apply_each_layouts_definition(base, write, layout: str, tmp_path: Path):
    written = write(layout)
    transformer = copy.deepcopy(base)
    adapters = AdapterSet(transformer)
    adapters.activate([wanted(saved(written, tmp_path))])
    updated = {module for module, (weight, _) in written.expected.items() if weight is not None}
    assert adapted(transformer) <= updated  # the others' dense updates went into the weights
    for module, (weight, bias) in written.expected.items():
        layer, pristine = transformer.get_submodule(module), base.get_submodule(module)
        x = inputs_for(pristine)
        want = SCALE * expected_delta(x, weight, bias)
        torch.testing.assert_close(delta(layer, pristine, x), want, rtol=1e-4, atol=1e-5)
    check_norms(transformer, base, written, SCALE)
    adapters.activate([wanted(saved(written, tmp_path), 0.0)])
    check_norms(transformer, base, written, 0.0)
    for module in written.expected:  # scale 0: the base layer's output, bit for bit
        pristine = base.get_submodule(module)
        x = inputs_for(pristine)
        assert torch.equal(transformer.get_submodule(module)(x), pristine(x)), module
    adapters.activate([])  # none: the model as loaded, every parameter bit for bit
    assert adapted(transformer) == set()
    pristine_state = base.state_dict()
    assert all(torch.equal(value, pristine_state[key]) for key, value in transformer.state_dict().items())


def test_dense_updates_go_into_plain_weights_and_come_back_bit_for_bit(base, write, tmp_path: Path, caplog):
    """A full-rank LoKr as a LoRA would cost two full-size products every forward: it is written
    into the weights instead (fp8 weights excepted), and taken out exactly."""
    transformer = copy.deepcopy(base)
    adapters = AdapterSet(transformer)
    with caplog.at_level(logging.INFO, logger="flux_lora.lora.adapters"):
        adapters.activate([wanted(saved(write("SimpleTuner LoKr"), tmp_path))])
    assert "(LyCORIS LoKr, 2 dense updates written into the weights)" in caplog.text
    assert adapted(transformer) == set()
    to_q = "transformer_blocks.0.attn.to_q.weight"
    assert not torch.equal(transformer.state_dict()[to_q], base.state_dict()[to_q])
    adapters.activate([])
    assert torch.equal(transformer.state_dict()[to_q], base.state_dict()[to_q])


@pytest.mark.parametrize(
    "layout", ["SimpleTuner LoKr", "kohya LoKr", "LoHa", "BFL with biases", "DoRA (OneTrainer)"]
)
def test_eager_adapters_in_bfloat16_stay_bfloat16_and_match(base, write, layout: str, tmp_path: Path):
    written = write(layout)
    transformer = copy.deepcopy(base).to(torch.bfloat16)
    AdapterSet(transformer).activate([wanted(saved(written, tmp_path))])
    assert {p.dtype for p in transformer.parameters()} == {torch.bfloat16}
    pristine_model = copy.deepcopy(base).to(torch.bfloat16)
    for module, (weight, bias) in written.expected.items():
        layer, pristine = transformer.get_submodule(module), pristine_model.get_submodule(module)
        x = inputs_for(pristine, torch.bfloat16)
        want = SCALE * expected_delta(x.float(), weight, bias)
        torch.testing.assert_close(delta(layer, pristine, x).float(), want, rtol=0.05, atol=0.03)


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_slots_and_merged_weights_apply_each_layout_exactly(base, write, layout: str, tmp_path: Path, caplog):
    """Updates up to the slot's rank go into the slot; higher ranks into the weight itself, the
    original kept: exact either way, and clearing the slot gives back every parameter."""
    written = write(layout)
    transformer = copy.deepcopy(base)
    slots = LoraSlots.install(transformer, SLOT_RANK)
    with caplog.at_level(logging.INFO, logger="flux_lora.lora.slots"):
        slots.activate([wanted(saved(written, tmp_path))])
    above = [
        m for m, (weight, _) in written.expected.items() if weight is not None and _rank(weight) > SLOT_RANK
    ]
    for module, (weight, bias) in written.expected.items():
        layer, pristine = transformer.get_submodule(module), base.get_submodule(module)
        x = inputs_for(pristine)
        want = SCALE * expected_delta(x, weight, bias)
        torch.testing.assert_close(delta(layer, pristine, x), want, rtol=1e-4, atol=1e-4)
    merged = re.search(
        r"(\d+) of \d+ layers above rank 8 \(FLUX_LORA_MAX_LORA_RANK\) written into the weights", caplog.text
    )
    assert (int(merged[1]) if merged else 0) >= len(above), caplog.text
    assert "approximated" not in caplog.text
    check_norms(transformer, base, written, SCALE)
    slots.activate([])
    pristine_state = base.state_dict()
    for key, value in transformer.state_dict().items():
        if ".lora_" not in key:
            assert torch.equal(value, pristine_state[key.replace(".base_layer.", ".")]), key


def _rank(weight: torch.Tensor) -> int:
    return int(torch.linalg.matrix_rank(weight, rtol=1e-5))  # float32 noise is not rank


@pytest.mark.parametrize("layout", ["SimpleTuner LoKr", "LoHa", "DoRA (OneTrainer)"])
def test_on_fp8_weights_slots_take_the_best_approximation_and_say_so(
    base, write, layout: str, tmp_path, caplog
):
    """An fp8 weight cannot take an update without quantizing again, so an update above the
    slot's rank becomes its best approximation of that rank (here: a full SVD of the expected
    update), and the log gives the largest relative error and where."""
    from flux_lora.device import quant

    fp8, pristine_fp8 = (quant.fp8_copy(base, torch.device("cpu"), text_tokens=512).module for _ in range(2))
    dequantized = ModuleNames.of(pristine_fp8).weight  # DoRA normalises the weight it is applied to
    written = write_layout(layout, base=dequantized)
    slots = LoraSlots.install(fp8, SLOT_RANK)
    with caplog.at_level(logging.INFO, logger="flux_lora.lora.slots"):
        slots.activate([wanted(saved(written, tmp_path))])
    errors = {}
    for module, (weight, bias) in written.expected.items():
        u, s, vh = torch.linalg.svd(weight.double(), full_matrices=False)
        tail = float(s[SLOT_RANK:].square().sum() / s.square().sum()) ** 0.5
        if tail > 1e-4:
            errors[module] = tail
        best = ((u[:, :SLOT_RANK] * s[:SLOT_RANK]) @ vh[:SLOT_RANK]).float()
        layer, pristine = fp8.get_submodule(module), pristine_fp8.get_submodule(module)
        x = inputs_for(pristine)
        torch.testing.assert_close(
            delta(layer, pristine, x), SCALE * expected_delta(x, best, bias), rtol=1e-3, atol=1e-3
        )
    line = re.search(r"(\d+) of \d+ layers above rank 8 approximated .* max ([\d.e-]+) at (\S+)", caplog.text)
    assert errors and line is not None, caplog.text
    worst = max(errors, key=errors.get)
    assert int(line[1]) >= len(errors)
    assert float(line[2]) == pytest.approx(errors[worst], rel=1e-2)
    assert line[3] == worst


# --- through the server ------------------------------------------------------------------------


def data_uri(written: Written) -> str:
    return bytes_to_data_uri(safetensors.torch.save(written.tensors, metadata=written.header))


@pytest.fixture(scope="module")
def base_picture(server: CogServer) -> list:
    return output_images(predict_ok(server, **FAST))


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_each_layout_changes_the_picture_through_the_server(
    server: CogServer, write, base_picture, layout: str
):
    written = write(layout)
    body = predict_ok(server, replicate_weights=data_uri(written), **FAST)
    assert output_images(body) != base_picture
    said = "text-encoder tensors not applied (LoRAs apply to the transformer only)"
    assert (said in body["logs"]) == bool(written.text_encoder_tensors), body["logs"]


def test_scale_zero_two_layouts_at_once_and_a_swap_back_through_the_server(
    server: CogServer, write, base_picture
):
    lokr, kohya = data_uri(write("SimpleTuner LoKr", seed=1)), data_uri(write("kohya", seed=2))
    assert output_images(predict_ok(server, replicate_weights=lokr, lora_scale=0, **FAST)) == base_picture
    alone = output_images(predict_ok(server, replicate_weights=lokr, **FAST))
    both = output_images(predict_ok(server, replicate_weights=lokr, extra_lora=kohya, **FAST))
    assert len({str(alone), str(both), str(base_picture)}) == 3
    assert output_images(predict_ok(server, **FAST)) == base_picture


def test_go_fast_takes_every_type_on_its_fp8_copy_and_swaps_back(server: CogServer, write):
    """The fp8 copy's layers (torchao's) take no LoRA bias in peft; bias updates are written
    into its biases, and a high-rank LoKr loads as on bf16."""
    fast = {**FAST, "go_fast": True}
    base = output_images(predict_ok(server, **fast))
    for layout in (
        "BFL with biases",
        "SimpleTuner LoKr",
        "weight and bias differences",
        "DoRA (LyCORIS, fused)",
    ):
        body = predict_ok(server, replicate_weights=data_uri(write(layout)), **fast)
        assert "fp8" in body["logs"] and "Warning" not in body["logs"], body["logs"]
        assert output_images(body) != base, layout
    assert output_images(predict_ok(server, **fast)) == base


@pytest.mark.parametrize("kind", ["eager", "slots"])
def test_dora_normalises_the_weight_as_loaded_not_another_adapters(base, write, kind: str, tmp_path: Path):
    """A weight difference written into to_q by one adapter must not change what a DoRA on to_q
    means: its norms are of the weight as loaded, whatever came before."""
    module = "transformer_blocks.0.attn.to_q"
    difference = torch.randn(32, 32, generator=torch.Generator().manual_seed(9))
    first = saved(Written(tensors={f"transformer.{module}.diff": difference}), tmp_path, "diff")
    dora = write("DoRA (peft)")
    transformer = copy.deepcopy(base)
    adapters = AdapterSet(transformer) if kind == "eager" else LoraSlots.install(transformer, SLOT_RANK)
    adapters.activate([wanted(first, 1.0)])
    if kind == "eager":  # the DoRA alone, loaded while the difference is in the weight
        adapters.activate([wanted(saved(dora, tmp_path), 1.0)])
        weight = dora.expected[module][0]
    else:  # both: the DoRA is staged while the difference is in the weight
        adapters.activate([wanted(first, 1.0), wanted(saved(dora, tmp_path), 1.0, "extra_lora")])
        weight = dora.expected[module][0] + difference
    layer, pristine = transformer.get_submodule(module), base.get_submodule(module)
    x = inputs_for(pristine)
    torch.testing.assert_close(
        delta(layer, pristine, x), expected_delta(x, weight, None), rtol=1e-4, atol=1e-4
    )


@pytest.mark.parametrize("kind", ["eager", "slots"])
def test_two_adapters_written_into_one_weight_add_at_their_scales(base, write, kind: str, tmp_path: Path):
    """A LoKr and a DoRA, both dense on to_q (and elsewhere), as main and extra at different
    scales: the weight holds both, each at its scale; dropping one leaves the
    other; dropping both gives back every parameter bit for bit."""
    lokr, dora = write("SimpleTuner LoKr"), write("DoRA (peft)")
    main, extra = saved(lokr, tmp_path, "lokr"), saved(dora, tmp_path, "dora")
    transformer = copy.deepcopy(base)
    adapters = AdapterSet(transformer) if kind == "eager" else LoraSlots.install(transformer, SLOT_RANK)
    module = "transformer_blocks.0.attn.to_q"
    layer, pristine = transformer.get_submodule(module), base.get_submodule(module)
    x = inputs_for(pristine)
    adapters.activate([wanted(main, 0.5), wanted(extra, -0.8, "extra_lora")])
    both = 0.5 * lokr.expected[module][0] - 0.8 * dora.expected[module][0]
    torch.testing.assert_close(delta(layer, pristine, x), expected_delta(x, both, None), rtol=1e-4, atol=1e-4)
    adapters.activate([wanted(extra, -0.8, "extra_lora")])
    alone = -0.8 * dora.expected[module][0]
    torch.testing.assert_close(
        delta(layer, pristine, x), expected_delta(x, alone, None), rtol=1e-4, atol=1e-4
    )
    adapters.activate([])
    pristine_state = base.state_dict()
    for key, value in transformer.state_dict().items():
        if ".lora_" not in key:
            assert torch.equal(value, pristine_state[key.replace(".base_layer.", ".")]), key
