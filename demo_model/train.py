"""Train the demo model (`demo_model.architecture`) on the synthetic world of `demo_model.world`.

    ./scripts/train-demo [--out weights/demo] [--quick] [--seed 0] [--threads 1] [--device cpu]

The default step counts take about 65 minutes on one CPU core for stages 1 to 4 and about 50 for
stage 5 (the record, training.json beside the weights, has each stage's time); `--quick` runs
every stage for a few steps in seconds. The committed model is in `demo/`.
On the CPU, results are reproducible for a given seed and thread count (the thread count changes
the order of floating-point sums). `--device cuda` (with a CUDA build of torch) trains the models
on a GPU, with TF32 off; the data (renders, latent pool, encoded prompts) and every random draw
stay on the CPU, so the draws are the same on any device. The arithmetic is not, and some CUDA
kernels are not deterministic, so a GPU run's weights differ from a CPU run's and from each other.

Five stages, seeded, each logged with its loss and a quick reading by the world's checker:
1. VAE: reconstruct rendered scenes, plain and striped (64 px); then encode a pool of renders,
   set shift_factor and scaling_factor from the latents' mean and spread, and freeze it.
2. Text encoders: a side task, predicting colour, shape and background from CLIP's pooled output
   and from T5's tokens (at both padded lengths the pipelines use), so that "a red circle on a
   blue background" and "a blue circle on a red background" encode apart; then frozen.
3. Transformer, by flow matching as FLUX is trained: x_s = (1 - s) x0 + s noise, target
   noise - x0, s drawn through the scheduler's own shift for 64 tokens; [dev] steps feed a
   guidance scale drawn from GUIDANCE_RANGE, and one step in SCHNELL_EVERY trains the
   guidance-free [schnell] twin (same weights) at [schnell]'s shift and text length. The saved
   weights are an exponential moving average.
4. A LoRA on the frozen transformer, trained on striped renders under the same prompts: stripes
   at scale 1, none at scale 0 (the base model).
5. A 5-level VAE that draws the same latents at 256 px (`demo_model.widen`), saved in place of
   the 64 px one: the transformer and the LoRA are unchanged.
The transformer's renders keep near the centre for the most part (POOL_LAYOUT says why).
`--sizes MODEL_DIR` runs stage 6 (`demo_model.sizes`) alone on a saved model: an experiment
towards drawing at every preset size, not part of the committed weights.

`demo_model.flow` feeds the transformer what the pipelines feed it, T5's long padding
compressed to runs of identical tokens.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import logging
import math
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from demo_model import architecture, flow, widen, world
from demo_model.flow import TextInputs
from demo_model.world import BACKGROUNDS, COLOURS, SHAPES, Box, Scene
from flux_lora.pipeline import MAX_SEQUENCE_LENGTH

log = logging.getLogger(__name__)

VARIANTS = ("dev", "schnell")
GUIDANCE_RANGE = (1.0, 5.0)  # [dev]'s guidance input; the server's default is 3
EVAL_GUIDANCE = 3.5
EVAL_STEPS = {"dev": 28, "schnell": flow.SCHNELL_STEPS}
SCHNELL_EVERY = 4  # one training step in this many trains the [schnell] twin
KL_WEIGHT = 1e-4  # per latent element, against the per-pixel squared error
EMA_DECAY = 0.999
# Where the transformer's (and the LoRA's) training renders put the shape. Drawing a shape at any
# place and size, as world.layout jitters them, takes this small model far more steps than
# an hour of CPU allows, while colour and background come quickly; so most renders keep near the
# centre (side and centre offset as fractions of the image), and a share keep the world's full
# jitter, so that img2img and inpaint still meet shapes anywhere. The VAE sees only the world's.
POOL_LAYOUT = {"side": (0.45, 0.55), "offset": 0.05, "world_share": 0.15}


@dataclass(frozen=True)
class Steps:
    vae: int
    text: int
    transformer: int
    lora: int


# Stages 1 to 4 take about 65 minutes on one CPU core (the record has the measured times).
FULL = Steps(vae=500, text=150, transformer=30000, lora=1500)
QUICK = Steps(vae=2, text=2, transformer=4, lora=2)


@dataclass(frozen=True)
class Settings:
    out: Path
    steps: Steps = FULL
    seed: int = 0
    threads: int = 1
    batch: int = 16
    renders_per_scene: int = 64  # jittered renders per scene and style in the latent pool
    eval_every: int = 5000  # transformer steps between quick readings
    eval_scenes: int = 12  # scenes (every n-th of the 44) in a quick reading
    log_every: int = 100
    lr: float = 1e-3
    lora_rank: int = 8
    lora_lr: float = 2e-3
    quick: bool = False
    device: str = "cpu"  # where the models train; the data and every random draw stay on the CPU


@dataclass
class Pool:
    """Encoded renders: posterior mean and std per latent, which scene, striped or not."""

    mean: torch.Tensor
    std: torch.Tensor
    scene: torch.Tensor
    striped: torch.Tensor


class Trainer:
    def __init__(self, settings: Settings):
        self.settings = settings
        self.scenes = world.all_scenes()
        self.rng = np.random.default_rng(settings.seed)
        self.generator = torch.Generator().manual_seed(settings.seed)
        self.device = torch.device(settings.device)
        self.record: dict[str, object] = {
            "settings": {**dataclasses.asdict(settings), "out": str(settings.out)},
            "command": " ".join(["python -m demo_model.train", *sys.argv[1:]]),
        }
        self.started = time.perf_counter()
        self.pool: Pool | None = None  # the transformer's and the LoRA's latents (stage 1)

    # -- the run -------------------------------------------------------------------------------

    def run(self) -> Path:
        with tempfile.TemporaryDirectory() as scratch:  # save() writes them again, identically
            clip_tokenizer, t5_tokenizer = architecture.build_tokenizers(Path(scratch))
        seed = self.settings.seed
        clip, t5 = architecture.new_text_encoders(clip_tokenizer, t5_tokenizer, seed + 1)
        vae = architecture.new_core_vae(seed + 3)
        dev = architecture.new_transformer(seed + 4)
        self.components = dict(
            scheduler=None,
            vae=vae,
            text_encoder=clip,
            tokenizer=clip_tokenizer,
            text_encoder_2=t5,
            tokenizer_2=t5_tokenizer,
            transformer=dev,
        )
        self.record["parameters"] = {
            "transformer": architecture.parameter_count([dev]),
            "vae": architecture.parameter_count([vae]),
            "clip": architecture.parameter_count([clip]),
            "t5": architecture.parameter_count([t5]),
        }
        log.info("parameters: %s", self.record["parameters"])
        for module in (vae, clip, t5, dev):
            module.to(self.device)

        self._stage("vae", self.train_vae)
        pool = self._stage("latents", self.encode_pool)
        self._stage("text", self.train_text)
        texts = self._stage("text_inputs", self.encode_texts)
        self.pool = pool
        ema = self._stage("transformer", lambda: self.train_transformer(texts))
        lora = self._stage("lora", lambda: self.train_lora(ema, texts))
        # The 64 px VAE as saved and loaded again (float16), as `--widen` on a saved model sees it.
        core = copy.deepcopy(vae).to(torch.float16).float()
        widener = widen.Widener(
            core, widen.WidenSettings.for_run(seed, quick=self.settings.quick), self.device
        )
        wide, self.record["widen"] = self._stage("widen", widener.train)
        components = {**self.components, "transformer": ema, "vae": wide}
        for module in components.values():  # saved from the CPU, whatever trained them
            if isinstance(module, torch.nn.Module):
                module.to("cpu")
        self.record["minutes"] = round(self.minutes(), 2)
        root = architecture.save(
            self.settings.out, components, architecture.schnell_twin(ema), lora, self.record
        )
        size = architecture.folder_size(root)
        self.record["folder_mb"] = round(size / 1e6, 2)
        (root / architecture.RECORD_FILE).write_text(json.dumps(self.record, indent=2) + "\n")
        log.info("saved %s (%.1f MB) after %.1f min", root, size / 1e6, self.record["minutes"])
        return root

    def _stage(self, name: str, work):
        started = time.perf_counter()
        log.info("== %s", name)
        result = work()
        seconds = time.perf_counter() - started
        self.record.setdefault("stage_seconds", {})[name] = round(seconds, 1)
        log.info("== %s done in %.1f min", name, seconds / 60)
        return result

    # -- stage 1: the VAE ----------------------------------------------------------------------

    def train_vae(self) -> None:
        vae, steps = self.components["vae"], self.settings.steps.vae
        optimizer = torch.optim.AdamW(vae.parameters(), lr=1e-3, weight_decay=0.0)
        schedule = _cosine(optimizer, steps, warmup=min(50, steps // 10))
        vae.train()
        losses = []
        for step in range(steps):
            scenes = [self._random_scene(striped=None) for _ in range(self.settings.batch)]
            images = self._render(scenes).to(self.device)
            posterior = vae.encode(images).latent_dist
            decoded = vae.decode(posterior.sample(generator=self.generator)).sample
            kl = posterior.kl().mean() / posterior.mean[0].numel()
            loss = F.mse_loss(decoded, images) + 0.1 * F.l1_loss(decoded, images) + KL_WEIGHT * kl
            _step(optimizer, schedule, loss, vae.parameters())
            losses.append(loss.item())
            self._log_loss("vae", step, steps, losses)
        vae.eval().requires_grad_(False)
        self.record["vae"] = {"loss": _tail_mean(losses), **self.check_vae()}
        log.info("vae round trip: %s", self.record["vae"])

    def check_vae(self) -> dict[str, float]:
        """The checker's reading of every scene, plain and striped, after an encode-decode."""
        vae = self.components["vae"]
        scenes = self.scenes + world.all_scenes(striped=True)
        images = self._render(scenes, layout="centred").to(self.device)
        with torch.no_grad():
            decoded = vae.decode(vae.encode(images).latent_dist.mode()).sample
        return architecture.reconstruction_reading(decoded, images, scenes)

    def encode_pool(self) -> Pool:
        """Renders of every scene, plain and striped (POOL_LAYOUT), encoded; sets the VAE's factors."""
        vae, count = self.components["vae"], self.settings.renders_per_scene
        items = [(index, striped) for striped in (False, True) for index in range(len(self.scenes))] * count
        pool = self.encode_renders(items, architecture.CORE_SIZE, chunk=64)
        samples = pool.mean + pool.std * torch.randn(pool.mean.shape, generator=self.generator)
        shift, spread = samples.mean().item(), samples.std().item()
        vae.register_to_config(shift_factor=round(shift, 4), scaling_factor=round(1 / spread, 4))
        self.record["latents"] = {
            "pool": len(items),
            "shift_factor": vae.config.shift_factor,
            "scaling_factor": vae.config.scaling_factor,
            "posterior_std": round(pool.std.mean().item() / spread, 4),  # relative to the spread
        }
        log.info("latents: %s", self.record["latents"])
        return pool

    def encode_renders(
        self, items: list[tuple[int, bool]], size: world.Size, chunk: int, dtype: torch.dtype = torch.float32
    ) -> Pool:
        """(scene index, striped) pairs rendered at `size` as the pool lays them out (POOL_LAYOUT),
        encoded by the VAE `chunk` at a time; the posterior kept in `dtype`."""
        vae = self.components["vae"]
        means, stds = [], []
        with torch.no_grad():
            for start in range(0, len(items), chunk):
                scenes = [
                    dataclasses.replace(self.scenes[i], striped=s) for i, s in items[start : start + chunk]
                ]
                images = architecture.to_tensor(
                    [world.paint(scene, size, self._pool_box(size)) for scene in scenes]
                )
                posterior = vae.encode(images.to(self.device)).latent_dist
                means.append(posterior.mean.cpu().to(dtype))
                stds.append(posterior.std.cpu().to(dtype))
        return Pool(
            mean=torch.cat(means),
            std=torch.cat(stds),
            scene=torch.tensor([i for i, _ in items]),
            striped=torch.tensor([s for _, s in items]),
        )

    # -- stage 2: the text encoders ------------------------------------------------------------

    def train_text(self) -> None:
        clip, t5 = self.components["text_encoder"], self.components["text_encoder_2"]
        steps = self.settings.steps.text
        labels = torch.tensor(
            [
                [
                    SHAPES.index(s.shape),
                    list(COLOURS).index(s.colour),
                    list(BACKGROUNDS).index(s.background),
                ]
                for s in self.scenes
            ],
            device=self.device,
        )
        clip_ids, t5_ids = self._token_ids()
        heads = torch.nn.ModuleDict(
            {
                "clip": torch.nn.Linear(architecture.CLIP_WIDTH, _CLASSES),
                "t5": torch.nn.Linear(architecture.T5_WIDTH, _CLASSES),
            }
        ).to(self.device)
        parameters = [*clip.parameters(), *t5.parameters(), *heads.parameters()]
        optimizer = torch.optim.AdamW(parameters, lr=2e-3, weight_decay=0.0)
        schedule = _cosine(optimizer, steps, warmup=min(20, steps // 10))
        clip.train()
        t5.train()
        losses = []
        for step in range(steps):
            variant = VARIANTS[step % 2]  # both padded lengths, in turn
            pooled = clip(clip_ids).pooler_output
            # T5 at 512 tokens costs most: a batch of the prompts each step.
            some = torch.randperm(len(self.scenes), generator=self.generator)[: self.settings.batch]
            some = some.to(self.device)
            tokens = t5(t5_ids[variant][some]).last_hidden_state
            loss = _attribute_loss(heads["clip"](pooled), labels)
            t5_logits = self._token_logits(heads["t5"], tokens, t5_ids[variant][some])
            loss = loss + _attribute_loss(t5_logits, labels[some])
            _step(optimizer, schedule, loss, parameters)
            architecture.pin_far_buckets(t5)
            losses.append(loss.item())
            self._log_loss("text", step, steps, losses, every=max(1, self.settings.log_every // 4))
        clip.eval().requires_grad_(False)
        t5.eval().requires_grad_(False)
        with torch.no_grad():
            accuracy = {"clip": _accuracy(heads["clip"](clip(clip_ids).pooler_output), labels)}
            for variant in VARIANTS:
                tokens = t5(t5_ids[variant]).last_hidden_state
                logits = self._token_logits(heads["t5"], tokens, t5_ids[variant])
                accuracy[f"t5_{MAX_SEQUENCE_LENGTH[variant]}"] = _accuracy(logits, labels)
        self.record["text"] = {"loss": _tail_mean(losses), "accuracy": accuracy}
        log.info("text side task: %s", self.record["text"])

    def _token_ids(self) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Token ids exactly as FluxPipeline makes them: CLIP padded to 77, T5 to each length."""
        prompts = [scene.prompt for scene in self.scenes]
        clip_tokenizer, t5_tokenizer = self.components["tokenizer"], self.components["tokenizer_2"]
        clip_ids = clip_tokenizer(
            prompts,
            padding="max_length",
            max_length=clip_tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids.to(self.device)
        t5_ids = {
            variant: t5_tokenizer(
                prompts,
                padding="max_length",
                max_length=MAX_SEQUENCE_LENGTH[variant],
                truncation=True,
                return_tensors="pt",
            ).input_ids.to(self.device)
            for variant in VARIANTS
        }
        return clip_ids, t5_ids

    def _token_logits(self, head, tokens: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """The mean of the per-token predictions over the prompt's tokens (padding excluded)."""
        words = (ids != self.components["tokenizer_2"].pad_token_id).unsqueeze(-1).float()
        return (head(tokens) * words).sum(1) / words.sum(1)

    def encode_texts(self) -> dict[str, TextInputs]:
        """Every prompt through the pipeline's own encode_prompt, for each release's length."""
        from diffusers import FluxPipeline

        pipe = FluxPipeline(**{**self.components, "scheduler": flow.new_scheduler("dev")})
        prompts = [scene.prompt for scene in self.scenes]
        texts = {}
        with torch.no_grad():
            for variant in VARIANTS:
                embeds, pooled, _ = pipe.encode_prompt(
                    prompts, prompt_2=None, max_sequence_length=MAX_SEQUENCE_LENGTH[variant]
                )
                context, log_runs = flow.compress_runs(embeds.cpu())
                texts[variant] = TextInputs(context, log_runs, pooled.cpu())
                error = self.context_error(embeds[:2], texts[variant], variant)
                self.record.setdefault("context", {})[variant] = {
                    "tokens": embeds.shape[1],
                    "runs": context.shape[1],
                    "context_error": error,
                }
        log.info("text inputs: %s", self.record["context"])
        return texts

    def context_error(self, embeds: torch.Tensor, text: TextInputs, variant: str) -> float:
        """Max difference between the transformer's output on the full context and on the runs."""
        transformer = self.components["transformer"]
        if variant == "schnell":
            transformer = architecture.schnell_twin(transformer)
        count = embeds.shape[0]
        device = self.device
        noisy = torch.randn(count, 64, 64, generator=self.generator).to(device)
        inputs = dict(
            hidden_states=noisy,
            pooled_projections=text.pooled[:count].to(device),
            timestep=torch.full((count,), 0.5, device=device),
            guidance=torch.full((count,), EVAL_GUIDANCE, device=device) if variant == "dev" else None,
            img_ids=flow.image_ids(device),
            return_dict=False,
        )
        with torch.no_grad():
            full = transformer(
                encoder_hidden_states=embeds, txt_ids=torch.zeros(embeds.shape[1], 3, device=device), **inputs
            )
            runs = transformer(**inputs, **flow.context_inputs(text, torch.arange(count), device))
        return float((full[0] - runs[0]).abs().max())

    # -- stage 3: the transformer --------------------------------------------------------------

    def train_transformer(self, texts: dict[str, TextInputs]):
        dev = self.components["transformer"]
        self.before_training(dev)
        twins = {"dev": dev, "schnell": architecture.schnell_twin(dev)}
        ema = copy.deepcopy(dev).requires_grad_(False)
        steps = self.settings.steps.transformer
        optimizer = torch.optim.AdamW(dev.parameters(), lr=self.settings.lr, weight_decay=0.01)
        schedule = _cosine(optimizer, steps, warmup=min(500, steps // 10))
        dev.train()
        losses: dict[str, list[float]] = {variant: [] for variant in VARIANTS}
        for step in range(steps):
            variant = "schnell" if step % SCHNELL_EVERY == SCHNELL_EVERY - 1 else "dev"
            loss = self.training_loss(twins[variant], variant, texts[variant], striped=False)
            _step(optimizer, schedule, loss, dev.parameters())
            _ema_update(ema, dev, min(EMA_DECAY, (1 + step) / (10 + step)))
            losses[variant].append(loss.item())
            self._log_loss("transformer", step, steps, losses["dev"])
            if (step + 1) % self.settings.eval_every == 0 and step + 1 < steps:
                self._log_quality(f"transformer step {step + 1}", ema)
        ema.eval()
        self.record["transformer"] = {
            "loss": {variant: _tail_mean(values) for variant, values in losses.items()},
            "quality": self._log_quality("transformer final", ema),
        }
        return ema

    def before_training(self, transformer) -> None:
        """Called on the transformer (or the LoRA-wrapped copy) a stage trains, before its first
        step. Stages 3 and 4 train it as it is; stage 6 (demo_model.sizes) constrains it."""

    def training_loss(self, transformer, variant: str, text: TextInputs, *, striped: bool) -> torch.Tensor:
        """One batch's flow-matching loss on the latent pool's plain or striped renders."""
        indices = torch.nonzero(self.pool.striped == striped).flatten()
        return self._flow_loss(transformer, variant, self.pool, indices, text, self.settings.batch)

    def _flow_loss(
        self, transformer, variant: str, pool: Pool, indices: torch.Tensor, text: TextInputs, batch: int
    ) -> torch.Tensor:
        chosen = indices[torch.randint(len(indices), (batch,), generator=self.generator)]
        rows, columns = (side // 2 for side in pool.mean.shape[-2:])  # latents packed 2x2
        tokens = rows * columns
        x0 = self._latents(pool, chosen)
        noise = torch.randn(x0.shape, generator=self.generator)
        sigma = flow.noise_levels(variant, batch, self.generator, tokens)
        noisy = (1 - sigma[:, None, None]) * x0 + sigma[:, None, None] * noise
        guidance = None
        device = self.device
        if variant == "dev":
            low, high = GUIDANCE_RANGE
            guidance = (low + (high - low) * torch.rand(batch, generator=self.generator)).to(device)
        prediction = transformer(
            hidden_states=noisy.to(device),
            pooled_projections=text.pooled[pool.scene[chosen]].to(device),
            timestep=sigma.to(device),  # the pipeline passes t / 1000 = sigma
            guidance=guidance,  # and the raw guidance scale
            img_ids=flow.image_ids(device, rows, columns),
            return_dict=False,
            **flow.context_inputs(text, pool.scene[chosen], device, tokens),
        )[0]
        return F.mse_loss(prediction, (noise - x0).to(device))

    def _latents(self, pool: Pool, chosen: torch.Tensor) -> torch.Tensor:
        """Packed, normalised latents as the pipeline's img2img makes them (a posterior sample)."""
        from diffusers import FluxPipeline

        vae = self.components["vae"]
        mean, std = pool.mean[chosen].float(), pool.std[chosen].float()
        latents = mean + std * torch.randn(mean.shape, generator=self.generator)
        latents = (latents - vae.config.shift_factor) * vae.config.scaling_factor
        return FluxPipeline._pack_latents(latents, *latents.shape)

    # -- stage 4: the LoRA ---------------------------------------------------------------------

    def train_lora(self, ema, texts: dict[str, TextInputs]) -> bytes:
        from peft import LoraConfig
        from peft.utils import get_peft_model_state_dict
        from safetensors.torch import save

        rank, steps = self.settings.lora_rank, self.settings.steps.lora
        styled = copy.deepcopy(ema)
        # peft draws the LoRA's initial weights from torch's global (CPU) stream, then moves them to
        # the base layer's device: the same draws on any device.
        styled.add_adapter(
            LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian", target_modules=LORA_TARGETS)
        )
        self.before_training(styled)
        twins = {"dev": styled, "schnell": architecture.schnell_twin(styled)}
        parameters = [p for p in styled.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(parameters, lr=self.settings.lora_lr, weight_decay=0.0)
        schedule = _cosine(optimizer, steps, warmup=min(50, steps // 10))
        styled.train()
        losses = []
        for step in range(steps):
            variant = "schnell" if step % SCHNELL_EVERY == SCHNELL_EVERY - 1 else "dev"
            loss = self.training_loss(twins[variant], variant, texts[variant], striped=True)
            _step(optimizer, schedule, loss, parameters)
            if variant == "dev":
                losses.append(loss.item())
            self._log_loss("lora", step, steps, losses)
        styled.eval()
        state = get_peft_model_state_dict(styled)
        tensors = {
            f"transformer.{key}": value.to(torch.float16).cpu().contiguous() for key, value in state.items()
        }
        self.record["lora"] = {
            "rank": rank,
            "layers": len(tensors) // 2,
            "loss": _tail_mean(losses),
            "stripes": self._log_quality("lora scale 1", styled, stripes=True),
        }
        return save(tensors)

    # -- readings ------------------------------------------------------------------------------

    def _log_quality(
        self, label: str, transformer, *, stripes: bool = False, size: tuple[int, int] | None = None
    ) -> dict[str, float]:
        """Generate every n-th scene with both releases' in-memory pipelines and judge them."""
        scenes = self.scenes[:: max(1, len(self.scenes) // self.settings.eval_scenes)]
        if self.settings.quick:
            scenes = scenes[:1]
        reading = {}
        for variant in VARIANTS:
            images = self.generate(transformer, variant, [scene.prompt for scene in scenes], size)
            verdicts = [world.judge(image, scene) for image, scene in zip(images, scenes, strict=True)]
            reading[variant] = {
                "all_ok": _mean(v.all_ok for v in verdicts),
                "background": _mean(v.background_ok for v in verdicts),
                "colour": _mean(v.colour_ok for v in verdicts),
                "shape": _mean(v.shape_ok for v in verdicts),
                "striped": _mean(v.striped for v in verdicts),
            }
        log.info("%s: %s", label, json.dumps(reading))
        self.record.setdefault("readings", {})[label] = reading
        return reading

    def generate(
        self, transformer, variant: str, prompts: list[str], size: tuple[int, int] | None = None
    ) -> list:
        """Images of `prompts` at `size` (width, height; default the core size), one seed."""
        from diffusers import FluxPipeline

        width, height = size or (architecture.CORE_SIZE, architecture.CORE_SIZE)
        if variant == "schnell":
            transformer = architecture.schnell_twin(transformer)
        pipe = FluxPipeline(
            **{**self.components, "scheduler": flow.new_scheduler(variant), "transformer": transformer}
        )
        pipe.set_progress_bar_config(disable=True)
        kwargs = {"guidance_scale": EVAL_GUIDANCE} if variant == "dev" else {}
        steps = 2 if self.settings.quick else EVAL_STEPS[variant]
        return pipe(
            prompts,
            height=height,
            width=width,
            num_inference_steps=steps,
            max_sequence_length=MAX_SEQUENCE_LENGTH[variant],
            generator=torch.Generator().manual_seed(self.settings.seed),
            **kwargs,
        ).images

    # -- helpers -------------------------------------------------------------------------------

    def _random_scene(self, striped: bool | None) -> Scene:
        scene = self.scenes[self.rng.integers(len(self.scenes))]
        return dataclasses.replace(scene, striped=bool(self.rng.integers(2)) if striped is None else striped)

    def _render(self, scenes: list[Scene], *, layout: str = "world") -> torch.Tensor:
        """Images in [-1, 1], (batch, 3, 64, 64), laid out as `layout` says: "world" jitters as
        world.render does, "centred" does not (the pool's layout: `encode_renders`)."""
        size = architecture.CORE_SIZE
        boxes = {
            "world": lambda: world.layout(size, self.rng),
            "centred": lambda: world.layout(size),
        }[layout]
        return architecture.to_tensor([world.paint(scene, size, boxes()) for scene in scenes])

    def _pool_box(self, size: world.Size = architecture.CORE_SIZE) -> Box:
        """Near the centre, but for a share of the world's full jitter (see POOL_LAYOUT)."""
        if self.rng.random() < POOL_LAYOUT["world_share"]:
            return world.layout(size, self.rng)
        width, height = world.canvas(size)
        short = min(width, height)
        side = self.rng.uniform(*POOL_LAYOUT["side"]) * short
        centre = np.array([height, width]) / 2
        top, left = centre - side / 2 + self.rng.uniform(-1, 1, 2) * POOL_LAYOUT["offset"] * short
        return Box(top, left, side, side)

    def _log_loss(self, stage: str, step: int, steps: int, losses: list[float], every: int = 0) -> None:
        every = every or self.settings.log_every
        if (step + 1) % every == 0 or step + 1 == steps:
            log.info(
                "%s step %d/%d loss %.4f (%.1f min)",
                stage,
                step + 1,
                steps,
                _tail_mean(losses),
                self.minutes(),
            )

    def minutes(self) -> float:
        """Minutes since the run started."""
        return (time.perf_counter() - self.started) / 60


# Every linear layer inside the blocks: attention, feed-forward, the single blocks' MLP. The
# embedders and the output layer stay out (the [schnell] twin shares the blocks, not those).
LORA_TARGETS = (
    r".*transformer_blocks\.\d+\.(attn\.(to_q|to_k|to_v|to_out\.0|add_q_proj|add_k_proj|add_v_proj|"
    r"to_add_out)|ff\.net\.(0\.proj|2)|ff_context\.net\.(0\.proj|2)|proj_mlp|proj_out)"
)
_CLASSES = len(SHAPES) + len(COLOURS) + len(BACKGROUNDS)


def _attribute_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    shape, colour, background = logits.split([len(SHAPES), len(COLOURS), len(BACKGROUNDS)], dim=-1)
    return sum(
        F.cross_entropy(part, labels[:, index]) for index, part in enumerate((shape, colour, background))
    )


def _accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    parts = logits.split([len(SHAPES), len(COLOURS), len(BACKGROUNDS)], dim=-1)
    right = torch.stack([part.argmax(-1) == labels[:, index] for index, part in enumerate(parts)]).all(0)
    return round(right.float().mean().item(), 4)


def _step(optimizer, schedule, loss: torch.Tensor, parameters) -> None:
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(list(parameters), 1.0)
    optimizer.step()
    schedule.step()


def _cosine(optimizer, steps: int, warmup: int):
    """Linear warm-up, then a cosine down to a tenth of the rate."""

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, steps - warmup)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def _ema_update(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    with torch.no_grad():
        for averaged, current in zip(ema.parameters(), model.parameters(), strict=True):
            averaged.lerp_(current, 1 - decay)


def _tail_mean(values: list[float], count: int = 100) -> float:
    tail = values[-count:]
    return round(sum(tail) / len(tail), 5) if tail else float("nan")


def _mean(values) -> float:
    values = list(values)
    return round(sum(map(float, values)) / len(values), 4) if values else float("nan")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m demo_model.train", description=__doc__.split("\n")[0])
    parser.add_argument(
        "--out",
        type=Path,
        default=Path("weights/demo"),
        help="model folder to write (default weights/demo; the committed one is demo/)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (results depend on it)")
    parser.add_argument("--quick", action="store_true", help="a few steps per stage: a smoke test")
    parser.add_argument(
        "--device",
        default="cpu",
        help="where the models train, e.g. cuda (default cpu); the random draws are the same on any",
    )
    parser.add_argument(
        "--sizes",
        type=Path,
        metavar="MODEL_DIR",
        help="stage 6 alone, in place: the transformer and the LoRA at every preset size "
        "(see demo_model/sizes.py); --transformer-steps, --lora-steps, --lr set it",
    )
    parser.add_argument(
        "--widen",
        type=Path,
        metavar="MODEL_DIR",
        help="only stage 5, in place, on a model trained before it existed (see demo_model/widen.py)",
    )
    for stage in ("vae", "text", "transformer", "lora"):
        parser.add_argument(
            f"--{stage}-steps", type=int, default=None, help=f"default {getattr(FULL, stage)}"
        )
    parser.add_argument("--batch", type=int, default=Settings.batch)
    parser.add_argument(
        "--lora-lr", type=float, default=Settings.lora_lr, help="the LoRA's peak learning rate"
    )
    parser.add_argument("--eval-every", type=int, default=Settings.eval_every)
    parser.add_argument(
        "--lr",
        type=float,
        default=None,
        help=f"the transformer's peak learning rate (default {Settings.lr}; stage 6 alone: 3e-4)",
    )
    args = parser.parse_args(argv)

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    base = QUICK if args.quick else FULL
    steps = Steps(
        **{
            stage: getattr(args, f"{stage}_steps") or getattr(base, stage)
            for stage in ("vae", "text", "transformer", "lora")
        }
    )
    settings = Settings(
        out=args.out,
        steps=steps,
        seed=args.seed,
        threads=args.threads,
        batch=4 if args.quick else args.batch,
        renders_per_scene=1 if args.quick else Settings.renders_per_scene,
        eval_every=args.eval_every,
        lr=args.lr or Settings.lr,
        lora_lr=args.lora_lr,
        log_every=1 if args.quick else Settings.log_every,
        quick=args.quick,
        device=args.device,
    )
    try:
        device = torch.device(args.device)
    except RuntimeError:
        parser.error(f"--device {args.device}: not a torch device; use cpu or cuda (cuda:N for the N-th GPU)")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            parser.error(
                f"--device {args.device}: this torch ({torch.__version__}) sees no CUDA GPU; "
                "install a CUDA build of torch on a machine with one, or leave --device out (cpu)"
            )
        # TF32 rounds float32 convolutions and matmuls to 10-bit mantissas; the VAE's figures are
        # read at 1/255, so keep full float32.
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    torch.set_num_threads(settings.threads)
    torch.manual_seed(settings.seed)
    if args.widen:
        widen.widen_folder(args.widen, widen.WidenSettings.for_run(args.seed, quick=args.quick), args.device)
        return 0
    if not args.sizes:
        Trainer(settings).run()
        return 0
    # Stage 6 runs only when asked, on a saved model: each run starts from the one before (sizes.py).
    from demo_model import sizes  # it builds on this module's Trainer

    base6 = sizes.QUICK_SIZES if args.quick else sizes.FULL_SIZES
    stage6 = sizes.SizeSteps(
        transformer=base6.transformer if args.transformer_steps is None else args.transformer_steps,
        lora=base6.lora if args.lora_steps is None else args.lora_steps,
    )
    settings6 = sizes.settings_for(
        args.sizes,
        args.seed,
        args.threads,
        quick=args.quick,
        device=args.device,
        steps=stage6,
        lr=args.lr or sizes.FINE_TUNE_LR,
        lora_lr=args.lora_lr,
    )
    sizes.train_sizes(args.sizes, *settings6)
    return 0


if __name__ == "__main__":
    sys.exit(main())
