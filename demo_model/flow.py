"""How the demo's training feeds FLUX's transformer what the pipelines feed it.

- Noise levels (`noise_levels`): the release's own scheduler shift for the demo's 64 image tokens,
  and for [schnell] half of them on its 4-step grid.
- Positions (`image_ids`): the pipeline's own grid of packed latents, 8x8 at the core size.
- The text (`compress_runs`, `context_inputs`): T5's padding (to 512 tokens for [dev], 256 for
  [schnell], without an attention mask) encodes to runs of identical vectors (see demo_model);
  identical text tokens stay identical through every FLUX block (text tokens all sit at position
  0), so training keeps one token per run and adds log(run length) to the attention scores on it:
  the same function as the pipeline's 512 tokens, at a tenth of the cost. The training record's
  `context_error` measures the difference (float rounding).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from demo_model import architecture

SCHNELL_STEPS = 4  # [schnell]'s step count: half its training noise levels sit on that grid
IMAGE_TOKENS = (architecture.CORE_SIZE // 8) ** 2  # 16x16 latents, packed 2x2
RUN_TOLERANCE = 1e-4  # T5 outputs closer than this (max abs) count as the same vector


@dataclass
class TextInputs:
    """Every scene's prompt, encoded as one pipeline encodes it, T5's runs compressed."""

    context: torch.Tensor  # (scenes, runs, T5 width)
    log_runs: torch.Tensor  # (scenes, runs): log of each run's length, the attention bias
    pooled: torch.Tensor  # (scenes, CLIP width)


def compress_runs(embeds: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(prompts, tokens, width) -> one vector per run of equal consecutive tokens, and the log of
    each run's length; prompts with fewer runs are filled with runs of weight ~0."""
    contexts, lengths = [], []
    for tokens in embeds:
        starts = torch.ones(len(tokens), dtype=torch.bool)
        starts[1:] = (tokens[1:] - tokens[:-1]).abs().amax(-1) > RUN_TOLERANCE
        run = torch.cumsum(starts, 0) - 1
        contexts.append(tokens[starts])
        lengths.append(torch.bincount(run).float())
    longest = max(len(c) for c in contexts)
    context = torch.zeros(len(contexts), longest, embeds.shape[-1])
    log_runs = torch.full((len(contexts), longest), -80.0)  # exp(-80): no weight at all
    for index, (tokens, length) in enumerate(zip(contexts, lengths, strict=True)):
        context[index, : len(tokens)] = tokens
        log_runs[index, : len(tokens)] = length.log()
    return context, log_runs


def noise_levels(
    variant: str, count: int, generator: torch.Generator, tokens: int = IMAGE_TOKENS
) -> torch.Tensor:
    """Training noise levels: logit-normal (a tenth uniform, for the ends), through the release's
    shift for `tokens` image tokens, as the pipeline shifts; half of [schnell]'s on its own
    4-step grid."""
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    scheduler = new_scheduler(variant)
    config = scheduler.config
    u = torch.sigmoid(torch.randn(count, generator=generator))
    uniform = torch.rand(count, generator=generator) < 0.1
    u = torch.where(uniform, torch.rand(count, generator=generator), u).clamp(1e-4, 1.0)
    if config.use_dynamic_shifting:
        mu = calculate_shift(
            tokens,
            config.base_image_seq_len,
            config.max_image_seq_len,
            config.base_shift,
            config.max_shift,
        )
        sigma = scheduler.time_shift(mu, 1.0, u)
    else:
        sigma = config.shift * u / (1 + (config.shift - 1) * u)
    if variant == "schnell":
        steps = SCHNELL_STEPS
        grid = torch.linspace(1.0, 1 / steps, steps)
        on_grid = torch.rand(count, generator=generator) < 0.5
        sigma = torch.where(on_grid, grid[torch.randint(steps, (count,), generator=generator)], sigma)
    return sigma.float()


def context_inputs(
    text: TextInputs, scenes: torch.Tensor, device: torch.device, tokens: int = IMAGE_TOKENS
) -> dict[str, object]:
    """The compressed context of `scenes` (indices into `text`, kept on the CPU) and its attention
    bias, on `device`: log(run length) on each text key, 0 on the `tokens` image keys (the
    processor passes `attention_mask` to scaled_dot_product_attention)."""
    log_runs = text.log_runs[scenes]
    bias = torch.cat([log_runs, torch.zeros(len(scenes), tokens)], dim=1)
    return dict(
        encoder_hidden_states=text.context[scenes].to(device),
        txt_ids=torch.zeros(text.context.shape[1], 3, device=device),
        joint_attention_kwargs={"attention_mask": bias[:, None, None, :].to(device)},
    )


def image_ids(device: torch.device, rows: int | None = None, columns: int | None = None) -> torch.Tensor:
    """The pipeline's position ids for a grid of packed latents (default: the core 8x8)."""
    from diffusers import FluxPipeline

    side = architecture.CORE_SIZE // 8
    return FluxPipeline._prepare_latent_image_ids(1, rows or side, columns or side, device, torch.float32)


def new_scheduler(variant: str):
    from diffusers import FlowMatchEulerDiscreteScheduler

    from flux_lora.testing import builder

    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, **builder.SCHEDULERS[variant])
