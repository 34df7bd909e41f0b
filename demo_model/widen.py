"""Stage 5 of the demo model's training: a wider VAE, so the model draws at the schema's sizes.

Stages 1 to 4 train at 64 px, where a small transformer learns the world in an hour of CPU, but
the schema's smallest image is 256 px. This stage trains a 5-level VAE (scale factor 16) that
speaks the 64 px VAE's latent space at 256 px: its decoder draws a 256 px render from the latent
the 64 px encoder gives the same scene at 64 px, and its encoder maps the 256 px render to that
latent. A 256x256 image then has the 16x16 latents and 64 tokens the transformer was trained on,
and the transformer and the LoRA are kept as they are. Two phases, each seeded on its own:
1. distil (2000 steps), two losses:
   - decoder: the 256 px render, from a posterior sample of the 64 px VAE (what the transformer
     draws is a sample, not a mean);
   - encoder: the 64 px VAE's posterior mean and log-variance, from the 256 px render.
2. robust (800 steps): the same, plus, on perturbed latents (a box of another latent pasted in,
   noise, blends), the 64 px decoder's own output upscaled.
Its GroupNorms take two groups (architecture.VAE), so the outer levels normalise 4 and 8 channels
together. Why not the 64 px VAE's 8 groups: with one or two channels a group at the outer levels,
each channel is normalised alone over the whole picture, so an inpainted box's statistics reach
every pixel and colour ripples across pictures (most on black). Measured that way, away from the
box the picture moved up to 57/255 after phase 1 and 25 after phase 2, where the 64 px decoder
stays within 2.5 (2 to 5, one scene 10, with the box's statistics swapped for a clean decode's).
With two groups the same two phases give a round trip of 2.5/255 against 7.3, and an inpainted
picture's rest stays within 2/255 of the input, within the round trip's error for 43 scenes of 44
(scripts/demo-quality; demo/README.md). One group gives much the same: round trip 2.55, 42 of 44.
Two other changes measured worse: a phase on latents the transformer itself draws, and the inner
levels frozen at the 64 px weights.
The inner levels start from the 64 px VAE's weights wherever their shapes match (the outer two
levels are new; the GroupNorms group differently, so it is a head start only), and the latent
factors (shift, scaling) are the 64 px VAE's.

    ./scripts/train-demo --widen MODEL_DIR [--seed 0] [--threads 1] [--device cpu]

widens the VAE of a model trained before this stage existed, in place; a full run does the same
after stage 4, from the float16 VAE it saves (so both paths train from the same weights).
"""

from __future__ import annotations

import json
import logging
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from demo_model import architecture, world
from demo_model.world import Box, Scene

log = logging.getLogger(__name__)

CORE_SIZE, WIDE_SIZE = architecture.CORE_SIZE, architecture.IMAGE_SIZE  # 64 px, 256 px
SCALE = WIDE_SIZE // CORE_SIZE  # 256 px renders of the 64 px layout
LOGVAR_WEIGHT = 0.01  # the posterior's spread matters far less than its mean
PHASES = ("distil", "robust")  # each phase's seed is the stage's plus its index here


@dataclass(frozen=True)
class WidenSettings:
    steps: int = 2000  # phase 1: distillation
    robust_steps: int = 800  # phase 2: distillation, and the core decoder on perturbed latents
    batch: int = 8
    lr: float = 1e-3
    robust_lr: float = 3e-4
    seed: int = 0
    log_every: int = 100

    @classmethod
    def for_run(cls, seed: int, *, quick: bool = False) -> WidenSettings:
        """The stage's settings in a training run with this seed (its own stream: seed + 5)."""
        if quick:
            return cls(steps=2, robust_steps=2, batch=2, seed=seed + 5, log_every=1)
        return cls(seed=seed + 5)


def new_wide_vae(core, seed: int):
    """The 5-level VAE, its inner levels copied from `core` where the shapes match."""
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    wide = AutoencoderKL(**architecture.VAE)
    wide.register_to_config(shift_factor=core.config.shift_factor, scaling_factor=core.config.scaling_factor)
    inherited = inherit(wide, core)
    log.info("wide VAE: %d of %d tensors start from the 64 px VAE", inherited, len(wide.state_dict()))
    return wide


def inherit(wide, core) -> int:
    """Copy `core`'s tensors into `wide` where a name, shifted past the new outer encoder levels,
    has the same shape; returns how many were copied."""
    extra = len(wide.config.block_out_channels) - len(core.config.block_out_channels)
    source = core.state_dict()
    copied = 0
    with torch.no_grad():
        for name, tensor in wide.state_dict().items():
            core_name = _core_name(name, extra)
            if core_name in source and source[core_name].shape == tensor.shape:
                tensor.copy_(source[core_name])
                copied += 1
    return copied


def _core_name(name: str, extra: int) -> str:
    """The encoder's down blocks count from the image side, so the core's block i is the wide
    VAE's block i + extra; the decoder's up blocks count from the latent side and line up."""
    prefix = "encoder.down_blocks."
    if name.startswith(prefix):
        index, rest = name[len(prefix) :].split(".", 1)
        return f"{prefix}{int(index) - extra}.{rest}"
    return name


class Widener:
    """Trains on `device`; renders and random draws are made on the CPU, as on any device."""

    def __init__(self, core, settings: WidenSettings, device: torch.device | str = "cpu"):
        self.device = torch.device(device)
        self.core = core.eval().requires_grad_(False).to(self.device)
        self.settings = settings
        self.rng = np.random.default_rng(settings.seed)  # each phase reseeds both
        self.generator = torch.Generator().manual_seed(settings.seed)
        self.scenes = world.all_scenes()

    def train(self):
        """Both phases from a new wide VAE; returns it and the stage's record."""
        settings = self.settings
        wide = new_wide_vae(self.core, settings.seed).to(self.device)
        phases = {"distil": self.phase(wide, "distil", settings.steps, settings.lr)}
        # As saved and loaded again (float16), so phase 2 run on a saved model (as the committed
        # one was made) trains from the same weights.
        wide.to(torch.float16).float()
        phases["robust"] = self.phase(wide, "robust", settings.robust_steps, settings.robust_lr, robust=True)
        wide.eval().requires_grad_(False)
        record = {
            "batch": settings.batch,
            "phases": phases,
            "parameters": architecture.parameter_count([wide]),
            **self.check(wide),
        }
        log.info("wide VAE: %s", record)
        return wide, record

    def phase(self, wide, name: str, steps: int, lr: float, *, robust: bool = False) -> dict:
        """Train `wide` for `steps`: distillation, plus with `robust` the 64 px decoder's own
        output, upscaled, on perturbed latents (`perturb`). Each phase draws from its own seeded
        streams, so it does not depend on what an earlier phase drew."""
        seed = self.settings.seed + list(PHASES).index(name)
        self.rng = np.random.default_rng(seed)
        self.generator = torch.Generator().manual_seed(seed)
        optimizer = torch.optim.AdamW(wide.parameters(), lr=lr, weight_decay=0.0)
        warmup = min(50, steps // 10)
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: min(1.0, (step + 1) / max(1, warmup)) * _cosine(step, steps)
        )
        wide.train().requires_grad_(True)
        losses: dict[str, list[float]] = {"decoder": [], "encoder": [], "robust": []}
        started = time.perf_counter()
        for step in range(steps):
            small, large = self.renders(self.settings.batch)
            with torch.no_grad():
                teacher = self.core.encode(small).latent_dist
                latent = teacher.sample(generator=self.generator)
            decoded = wide.decode(latent).sample
            decoder_loss = F.mse_loss(decoded, large) + 0.1 * F.l1_loss(decoded, large)
            student = wide.encode(large).latent_dist
            encoder_loss = F.mse_loss(student.mean, teacher.mean) + LOGVAR_WEIGHT * F.mse_loss(
                student.logvar, teacher.logvar
            )
            loss = decoder_loss + encoder_loss
            if robust:
                with torch.no_grad():
                    odd = self.perturb(latent)
                    target = F.interpolate(self.core.decode(odd).sample, scale_factor=SCALE, mode="bicubic")
                robust_loss = F.mse_loss(wide.decode(odd).sample, target.clamp(-1, 1))
                loss = loss + robust_loss
                losses["robust"].append(robust_loss.item())
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(wide.parameters(), 1.0)
            optimizer.step()
            schedule.step()
            losses["decoder"].append(decoder_loss.item())
            losses["encoder"].append(encoder_loss.item())
            if (step + 1) % self.settings.log_every == 0 or step + 1 == steps:
                log.info(
                    "widen %s step %d/%d losses %s (%.1f s/step)",
                    name,
                    step + 1,
                    steps,
                    {part: _tail(values) for part, values in losses.items() if values},
                    (time.perf_counter() - started) / (step + 1),
                )
        return {
            "steps": steps,
            "lr": lr,
            "loss": {part: _tail(values) for part, values in losses.items() if values},
        }

    def perturb(self, latent: torch.Tensor) -> torch.Tensor:
        """Latents no render encodes to, like the ones an inpainted or half-denoised picture has:
        half the batch, each with a box of another one's latent pasted in, noise added, or
        blended with another one."""
        count = len(latent) // 2
        odd, other = latent[:count].clone(), latent[count : 2 * count]
        side = latent.shape[-1]
        spread = 1 / self.core.config.scaling_factor
        for index in range(count):
            kind = self.rng.integers(3)
            if kind == 0:
                height, width = self.rng.integers(side // 4, 3 * side // 4 + 1, 2)
                top, left = self.rng.integers(0, side - height + 1), self.rng.integers(0, side - width + 1)
                odd[index, :, top : top + height, left : left + width] = other[
                    index, :, top : top + height, left : left + width
                ]
            elif kind == 1:
                noise = torch.randn(odd[index].shape, generator=self.generator).to(odd.device)
                odd[index] += spread * self.rng.uniform(0.1, 0.6) * noise
            else:
                share = self.rng.uniform()
                odd[index] = share * odd[index] + (1 - share) * other[index]
        return odd

    def renders(self, count: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Random scenes (plain or striped) in random boxes, at 64 and at 256 px, in [-1, 1], on
        the training device."""
        pairs = []
        for _ in range(count):
            scene = self.scenes[self.rng.integers(len(self.scenes))]
            scene = Scene(scene.shape, scene.colour, scene.background, bool(self.rng.integers(2)))
            pairs.append(render_pair(scene, world.layout(CORE_SIZE, self.rng)))
        return _stacked(pairs, self.device)

    def check(self, wide) -> dict[str, float]:
        """At 256 px, over every scene plain and striped (centred): the checker's reading of the
        wide VAE's round trip and of its decoding of the 64 px VAE's latents, and how far the
        wide encoder lands from the 64 px one (relative to the latents' spread)."""
        scenes = self.scenes + world.all_scenes(striped=True)
        small, large = _stacked(
            [render_pair(scene, world.layout(CORE_SIZE)) for scene in scenes], self.device
        )
        with torch.no_grad():
            core_latent = self.core.encode(small).latent_dist.mode()
            wide_latent = wide.encode(large).latent_dist.mode()
            decoded = wide.decode(core_latent).sample
            round_trip = wide.decode(wide_latent).sample
        spread = 1 / wide.config.scaling_factor
        return {
            "latent_error": round(float((wide_latent - core_latent).abs().mean() / spread), 4),
            "round_trip": architecture.reconstruction_reading(round_trip, large, scenes),
            "from_64px_latents": architecture.reconstruction_reading(decoded, large, scenes),
        }


def render_pair(scene: Scene, box: Box):
    """The scene in a box of the 64 px layout, painted at 64 px and at 256 px."""
    return world.paint(scene, CORE_SIZE, box), world.paint(scene, WIDE_SIZE, Box(*(SCALE * v for v in box)))


def _stacked(pairs, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    small, large = zip(*pairs, strict=True)
    return architecture.to_tensor(small).to(device), architecture.to_tensor(large).to(device)


def widen_folder(root: Path, settings: WidenSettings, device: torch.device | str = "cpu") -> dict:
    """Widen the VAE of the trained model in `root` in place (both releases) and add the stage
    to its training record."""
    from diffusers import AutoencoderKL

    root = Path(root)
    core = AutoencoderKL.from_pretrained(root / "FLUX.1-dev" / "vae", torch_dtype=torch.float32)
    if len(core.config.block_out_channels) != len(architecture.CORE_VAE["block_out_channels"]):
        raise SystemExit(f"{root}'s VAE has {len(core.config.block_out_channels)} levels: already widened?")
    started = time.perf_counter()
    wide, record = Widener(core, settings, device).train()
    record["seconds"] = round(time.perf_counter() - started, 1)
    record["command"] = " ".join(["python -m demo_model.train", *sys.argv[1:]])
    architecture.replace_vae(root, wide.to("cpu"))
    training = json.loads((root / architecture.RECORD_FILE).read_text())
    training["widen"] = record
    training.setdefault("stage_seconds", {})["widen"] = record.pop("seconds")
    training["folder_mb"] = round(architecture.folder_size(root) / 1e6, 2)
    (root / architecture.RECORD_FILE).write_text(json.dumps(training, indent=2) + "\n")
    return record


def _cosine(step: int, steps: int) -> float:
    progress = min(1.0, step / max(1, steps))
    return 0.1 + 0.9 * 0.5 * (1 + np.cos(np.pi * progress))


def _tail(values: list[float], count: int = 50) -> float:
    tail = values[-count:]
    return round(sum(tail) / len(tail), 5)
