"""Stage 6's silenced rotary pairs (demo_model/positions.py): which channels, that no attention
score reads them afterwards, and that training (AdamW with weight decay, and a LoRA) keeps them
silent."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from demo_model import architecture, positions

TOKENS = (6, 5)  # rows, columns of packed latents
TEXT_TOKENS = 3


@pytest.fixture
def transformer():
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(0)
    return FluxTransformer2DModel(**architecture.TRANSFORMER, guidance_embeds=False).eval()


def forward(transformer, seed: int = 1) -> torch.Tensor:
    from diffusers import FluxPipeline

    generator = torch.Generator().manual_seed(seed)
    rows, columns = TOKENS
    width = architecture.TRANSFORMER["joint_attention_dim"]
    return transformer(
        hidden_states=torch.randn(1, rows * columns, 64, generator=generator),
        encoder_hidden_states=torch.randn(1, TEXT_TOKENS, width, generator=generator),
        pooled_projections=torch.randn(
            1, architecture.TRANSFORMER["pooled_projection_dim"], generator=generator
        ),
        timestep=torch.tensor([0.7]),
        img_ids=FluxPipeline._prepare_latent_image_ids(1, rows, columns, "cpu", torch.float32),
        txt_ids=torch.zeros(TEXT_TOKENS, 3),
        return_dict=False,
    )[0]


def fast_pairs_still(transformer) -> None:
    """Make the position embedding leave the silent channels unrotated (cos 1, sin 0)."""
    silent = positions.silent_channels(transformer)
    embed = transformer.pos_embed.forward

    def unrotated(ids):
        cos, sin = embed(ids)
        return cos.masked_fill(silent, 1.0), sin.masked_fill(silent, 0.0)

    transformer.pos_embed.forward = unrotated


def test_the_silent_channels_are_the_pairs_that_turn_past_half_a_circle_on_the_longest_grid(transformer):
    frequencies = positions.pair_frequencies(transformer)
    assert [len(f) * 2 for f in frequencies] == list(architecture.TRANSFORMER["axes_dims_rope"])
    silent = positions.silent_channels(transformer).tolist()
    start = 0
    for axis, axis_frequencies in enumerate(frequencies):
        for pair, frequency in enumerate(axis_frequencies.tolist()):
            turns_past_half = frequency * (positions.LONGEST_SIDE_TOKENS - 1) > math.pi
            expected = axis > 0 and turns_past_half
            assert silent[start + 2 * pair] == silent[start + 2 * pair + 1] == expected
        start += 2 * len(axis_frequencies)
    # the demo's (8, 12, 12): rows and columns each lose their 1 and 0.22 rad/token pairs
    assert sum(silent) == 8
    assert [index for index, flag in enumerate(silent) if flag] == [8, 9, 10, 11, 20, 21, 22, 23]


def test_once_silenced_no_score_reads_the_fast_pairs(transformer):
    silenced = copy.deepcopy(transformer)
    before = forward(transformer)
    fast_pairs_still(transformer)
    assert not torch.allclose(forward(transformer), before, atol=1e-4)  # the check can fail

    assert positions.silence_fast_pairs(silenced) == 8
    assert positions.silenced_rows_are_zero(silenced)
    rotated = forward(silenced)
    fast_pairs_still(silenced)
    torch.testing.assert_close(forward(silenced), rotated, rtol=0, atol=1e-6)


def test_adamw_with_weight_decay_keeps_the_silenced_rows_at_zero(transformer):
    transformer.train()
    positions.silence_fast_pairs(transformer)
    key = transformer.transformer_blocks[0].attn.to_k.weight
    before = key.detach().clone()
    optimizer = torch.optim.AdamW(transformer.parameters(), lr=1e-2, weight_decay=0.01)
    for seed in range(3):
        optimizer.zero_grad()
        forward(transformer, seed).pow(2).mean().backward()
        optimizer.step()
    assert positions.silenced_rows_are_zero(transformer)
    assert not torch.equal(key.detach(), before)  # the other rows did train


def test_a_lora_trained_on_the_silenced_model_keeps_the_fast_pairs_silent(transformer):
    from peft import LoraConfig

    from demo_model.train import LORA_TARGETS

    positions.silence_fast_pairs(transformer)
    transformer.requires_grad_(False)
    transformer.add_adapter(
        LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian", target_modules=LORA_TARGETS)
    )
    positions.silence_fast_pairs(transformer)
    parameters = [p for p in transformer.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(parameters, lr=1e-2)
    for seed in range(3):
        optimizer.zero_grad()
        forward(transformer, seed).pow(2).mean().backward()
        optimizer.step()
    up = transformer.transformer_blocks[0].attn.to_k.lora_B["default"].weight
    assert up.abs().sum() > 0  # the LoRA trained
    assert positions.silenced_rows_are_zero(transformer)
