"""The trained demo model's quality, measured with the synthetic world's checker.

    ./scripts/demo-quality [--model demo] [--seeds 3] [--record FILE]

Everything runs through our own loader and `FluxPipelines.generate` at the model's size (256x256
for the committed model), as the server would run it:
- txt2img: every scene (44) x seeds, [dev] at 28 steps (guidance 3.5) and [schnell] at 4: the
  share with colour, background and shape all right, and each part's share;
- img2img at prompt_strength 0.3 on a jittered render of each scene: the outline overlap between
  input and output (the target: >= 0.85);
- inpaint: a centred render with a box over its shape, repainted under another scene's prompt
  with the same background: the box's pixels change (mean change, and the share the checker reads
  as the new scene), while the pixels away from the box (BOX_MARGIN px out) stay within the VAE's
  round-trip error on that image (the pipeline blends the image's posterior sample back outside
  the mask, so a round trip is the floor; the decoder still carries a trace of the repainted box
  past it, through its attention and GroupNorm statistics, so the same pixels' own round-trip
  error is reported beside it);
- the LoRA (stripes-lora.safetensors) through our AdapterSet: striped share at scale 1 and 0;
- every size (`sizes`): txt2img of every SIZES_EVERY-th scene, one seed, at each aspect_ratio
  preset at megapixels 0.25 and 1, [dev] and [schnell]: the share all right, per size. A size
  counts as drawn (world.json) when both releases reach DRAWN.
Writes a JSON record (default: quality.json beside the model) and prints it; `--part sizes`
measures the sizes only and updates that part of the record. `--part wide [--ratios R ...]` is a
wider look at chosen sizes, every scene with WIDE_SEEDS seeds, kept in the record's `wide` part
apart from the sizes that decide what counts as drawn:

    ./scripts/demo-quality --part wide --ratios 9:21 1:1 --threads 2
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from demo_model import architecture, world
from demo_model.world import Scene
from flux_lora.lora.adapters import AdapterSet, WantedAdapter
from flux_lora.models.layout import DEMO_MODEL_DIR, ModelSource
from flux_lora.pipeline import FluxPipelines
from flux_lora.schema import ASPECT_RATIOS, MEGAPIXELS, GenerationRequest

log = logging.getLogger(__name__)

SIZE = architecture.IMAGE_SIZE
STEPS = {"dev": 28, "schnell": 4}
GUIDANCE = 3.5
IMG2IMG_STRENGTH = 0.3
MIN_OVERLAP = 0.85  # the target for img2img at strength 0.3
INPAINT_STRENGTH = 0.8  # the schema's default prompt_strength
BOX_MARGIN = SIZE // 8  # px: the decoder spreads a latent's change about two latents (16 px each)
MIN_CHANGE = 20.0  # mean absolute change (0..255) that counts as repainted
SIZES_EVERY = 4  # every 4th scene: 11 of 44, every shape, colour and background
DRAWN = 0.8  # a size the model draws: this share of scenes all right, with both releases
WIDE_SEEDS = 2  # --part wide: every scene with seeds 0 and 1, 88 images a size and release


def measure(
    root: Path,
    seeds: int = 3,
    scenes: list[Scene] | None = None,
    steps: dict | None = None,
    ratios: list[str] | None = None,
) -> dict:
    """Every figure of the module docstring for the model folder `root` (`ratios`: the aspect
    ratios of the sizes part, default all)."""
    started = time.perf_counter()
    scenes = scenes or world.all_scenes()
    steps = steps or STEPS
    pipelines = load(root)
    record: dict[str, object] = {"model": str(root), "scenes": len(scenes), "seeds": seeds, "steps": steps}
    record["txt2img"] = {
        variant: txt2img(pipelines, variant, scenes, seeds, steps[variant]) for variant in steps
    }
    record["img2img"] = img2img(pipelines, scenes, steps["dev"])
    record["inpaint"] = inpaint(pipelines, scenes, steps["dev"])
    lora = Path(root) / architecture.LORA_FILE
    if lora.is_file():
        record["lora"] = {
            variant: lora_stripes(pipelines, variant, lora, scenes, steps[variant]) for variant in steps
        }
    record["sizes"] = sizes(pipelines, scenes[::SIZES_EVERY], steps, ratios)
    record["seconds"] = round(time.perf_counter() - started, 1)
    return record


def load(root: Path) -> FluxPipelines:
    return FluxPipelines.load(ModelSource(Path(root)), torch.device("cpu"))


def sizes(
    pipelines: FluxPipelines,
    scenes: list[Scene],
    steps: dict,
    ratios: list[str] | None = None,
    seeds: int = 1,
) -> dict:
    """Per `megapixels` choice and aspect ratio: the share of `scenes` x `seeds` drawn all right."""
    found: dict[str, dict] = {}
    for megapixels, divisor in MEGAPIXELS.items():
        for ratio in ratios or ASPECT_RATIOS:
            width, height = ASPECT_RATIOS[ratio]
            size = (width // divisor, height // divisor)
            shares = {}
            for variant in steps:
                verdicts = [
                    world.judge(
                        pipelines.generate(request(scene, variant, steps[variant]), size=size, seed=seed)[0],
                        scene,
                    )
                    for seed in range(seeds)
                    for scene in scenes
                ]
                shares[variant] = _share(v.all_ok for v in verdicts)
            found.setdefault(f"{megapixels} MP", {})[f"{ratio} {size[0]}x{size[1]}"] = shares
            log.info("sizes: %s MP %s %dx%d: %s", megapixels, ratio, *size, shares)
    return {"scenes": len(scenes), "seeds": seeds, **found}


def drawn_sizes(record: dict) -> set[tuple[int, int]]:
    """The sizes `record` measured the model drawing (DRAWN), 256x256 from the txt2img part."""
    found = set()
    if all(record.get("txt2img", {}).get(variant, {}).get("all_ok", 0) >= DRAWN for variant in STEPS):
        found.add((SIZE, SIZE))
    for megapixels in MEGAPIXELS:
        for label, shares in record.get("sizes", {}).get(f"{megapixels} MP", {}).items():
            if all(shares[variant] >= DRAWN for variant in STEPS):
                width, height = label.rsplit(" ", 1)[1].split("x")
                found.add((int(width), int(height)))
    return found


def request(scene: Scene, variant: str, steps: int, **fields) -> GenerationRequest:
    return GenerationRequest(
        prompt=scene.prompt, model=variant, num_inference_steps=steps, guidance_scale=GUIDANCE, **fields
    )


def txt2img(pipelines: FluxPipelines, variant: str, scenes: list[Scene], seeds: int, steps: int) -> dict:
    verdicts = []
    for seed in range(seeds):
        for scene in scenes:
            (image,) = pipelines.generate(request(scene, variant, steps), size=(SIZE, SIZE), seed=seed)
            verdicts.append(world.judge(image, scene))
    return {
        "all_ok": _share(v.all_ok for v in verdicts),
        "background": _share(v.background_ok for v in verdicts),
        "colour": _share(v.colour_ok for v in verdicts),
        "shape": _share(v.shape_ok for v in verdicts),
        "images": len(verdicts),
    }


def img2img(pipelines: FluxPipelines, scenes: list[Scene], steps: int) -> dict:
    overlaps, verdicts = [], []
    for index, scene in enumerate(scenes):
        source = world.render(scene, SIZE, rng=np.random.default_rng(1000 + index))
        (image,) = pipelines.generate(
            request(scene, "dev", steps, prompt_strength=IMG2IMG_STRENGTH),
            size=(SIZE, SIZE),
            seed=index,
            image=source,
        )
        overlaps.append(world.outline_overlap(source, image))
        verdicts.append(world.judge(image, scene))
    return {
        "strength": IMG2IMG_STRENGTH,
        "overlap_mean": round(statistics.fmean(overlaps), 4),
        "overlap_min": round(min(overlaps), 4),
        f"share_at_least_{MIN_OVERLAP}": _share(o >= MIN_OVERLAP for o in overlaps),
        "all_ok": _share(v.all_ok for v in verdicts),
    }


def inpaint_regions() -> tuple[Image.Image, np.ndarray, np.ndarray]:
    """The inpaint mask (a box over the centred shape), its pixels, and the pixels BOX_MARGIN
    clear of it: where the rest of the picture is measured."""
    box = world.layout(SIZE)  # the centred shape's box
    top, left, bottom, right = (
        round(v) for v in (box.top, box.left, box.top + box.height, box.left + box.width)
    )
    inside = np.zeros((SIZE, SIZE), bool)
    inside[top:bottom, left:right] = True
    away = np.ones((SIZE, SIZE), bool)
    away[max(0, top - BOX_MARGIN) : bottom + BOX_MARGIN, max(0, left - BOX_MARGIN) : right + BOX_MARGIN] = (
        False
    )
    mask = Image.fromarray(np.where(inside, 255, 0).astype(np.uint8), "L").convert("RGB")
    return mask, inside, away


def inpaint(pipelines: FluxPipelines, scenes: list[Scene], steps: int) -> dict:
    mask, inside, away = inpaint_regions()
    vae = pipelines.variant("dev").txt2img.vae
    readings, judged = [], []
    for index, scene in enumerate(scenes):
        target = other_scene(scene, index)
        source = world.render(scene, SIZE)
        (image,) = pipelines.generate(
            request(target, "dev", steps, prompt_strength=INPAINT_STRENGTH),
            size=(SIZE, SIZE),
            seed=index,
            image=source,
            mask=mask,
        )
        readings.append(inpaint_reading(vae, source, image, index, inside, away))
        judged.append(world.judge(image, target).all_ok)
    changes, errors, floors, rest_floors = (
        [reading[part] for reading in readings] for part in ("change", "rest", "floor", "rest_floor")
    )
    return {
        "strength": INPAINT_STRENGTH,
        "masked_change_mean": round(statistics.fmean(changes), 2),
        f"share_changed_over_{MIN_CHANGE:g}": _share(c > MIN_CHANGE for c in changes),
        "share_new_scene_all_ok": _share(judged),
        # Mean absolute differences from the input, in levels of 0..255.
        "rest_error_mean": round(statistics.fmean(errors), 3),
        "rest_error_max": round(max(errors), 3),
        "vae_round_trip_error_mean": round(statistics.fmean(floors), 3),
        "vae_round_trip_error_on_rest_mean": round(statistics.fmean(rest_floors), 3),
        # The target: the rest no farther from the input than a round trip takes that image.
        "share_rest_within_round_trip": _share(e <= f for e, f in zip(errors, floors, strict=True)),
    }


def lora_stripes(pipelines: FluxPipelines, variant: str, lora: Path, scenes: list[Scene], steps: int) -> dict:
    adapters = AdapterSet(pipelines.variant(variant).txt2img.transformer)
    shares = {}
    try:
        for scale in (1.0, 0.0):
            wanted = WantedAdapter("demo-stripes", str(lora), scale, "lora_weights", lora.name)
            adapters.activate([wanted])
            striped = []
            for index, scene in enumerate(scenes):
                (image,) = pipelines.generate(request(scene, variant, steps), size=(SIZE, SIZE), seed=index)
                striped.append(world.judge(image, scene).striped)
            shares[f"striped_at_scale_{scale:g}"] = _share(striped)
    finally:
        adapters.activate([])
    return shares


def other_scene(scene: Scene, index: int) -> Scene:
    """A scene on the same background with another colour and shape, varied with `index`."""
    options = [
        other
        for other in world.all_scenes()
        if other.background == scene.background
        and other.colour != scene.colour
        and other.shape != scene.shape
    ]
    return options[index % len(options)]


def inpaint_reading(
    vae, source: Image.Image, image: Image.Image, seed: int, inside: np.ndarray, away: np.ndarray
) -> dict[str, float]:
    """One inpaint of `source` into `image`, in mean absolute levels of 0..255: the box's change,
    the rest's distance from the input, and a round trip's error (a posterior sample drawn with
    `seed`) over the whole image and over the rest."""
    before = world.rgb_array(source)
    difference = np.abs(world.rgb_array(image) - before).mean(-1)
    trip = np.abs(world.rgb_array(round_trip(vae, source, seed)) - before).mean(-1)
    return {
        "change": float(difference[inside].mean()),
        "rest": float(difference[away].mean()),
        "floor": float(trip.mean()),
        "rest_floor": float(trip[away].mean()),
    }


def round_trip(vae, image: Image.Image, seed: int) -> Image.Image:
    """Encode (a posterior sample, as the inpaint pipeline takes it) and decode."""
    with torch.no_grad():
        pixels = architecture.to_tensor([image.convert("RGB")]).to(vae.dtype)
        latents = vae.encode(pixels).latent_dist.sample(torch.Generator().manual_seed(seed))
        return architecture.to_pil(vae.decode(latents).sample.float())[0]


def _share(values) -> float:
    values = list(values)
    return round(sum(map(bool, values)) / len(values), 4) if values else float("nan")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", type=Path, default=DEMO_MODEL_DIR, help="the trained model folder")
    parser.add_argument("--seeds", type=int, default=3, help="txt2img seeds per scene")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--record", type=Path, default=None, help="default: <model>/quality.json")
    parser.add_argument(
        "--part",
        choices=["all", "sizes", "wide"],
        default="all",
        help=f"sizes: only the sizes; wide: every scene x {WIDE_SEEDS} seeds at --ratios",
    )
    parser.add_argument(
        "--ratios",
        nargs="+",
        choices=list(ASPECT_RATIOS),
        metavar="RATIO",
        help="--part wide: the aspect ratios to look at, both megapixels (default: all 11)",
    )
    parser.add_argument(
        "--write-world",
        action="store_true",
        help="rewrite the model's world.json with the sizes measured drawn (the server logs the others)",
    )
    args = parser.parse_args(argv)
    if args.ratios and args.part != "wide":
        parser.error("--ratios: only --part wide looks at chosen sizes; the other parts measure every size")
    if args.write_world and args.part == "wide":
        parser.error("--write-world: --part wide does not decide what is drawn; use --part sizes or all")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    torch.set_num_threads(args.threads)
    path = args.record or args.model / "quality.json"
    started = time.perf_counter()
    if args.part == "all":
        record = measure(args.model, args.seeds)
    else:  # one part, into the record as it stands
        record = json.loads(path.read_text()) if path.is_file() else {"model": str(args.model)}
    if args.part == "sizes":
        record["sizes"] = sizes(load(args.model), world.all_scenes()[::SIZES_EVERY], STEPS)
        record["sizes"]["seconds"] = round(time.perf_counter() - started, 1)
    if args.part == "wide":
        looked = sizes(load(args.model), world.all_scenes(), STEPS, args.ratios, WIDE_SEEDS)
        wide = record.setdefault("wide", {})
        for megapixels in MEGAPIXELS:  # sizes looked at before, and not now, keep their figures
            wide[f"{megapixels} MP"] = {**wide.get(f"{megapixels} MP", {}), **looked[f"{megapixels} MP"]}
        wide.update(scenes=looked["scenes"], seeds=looked["seeds"])
        log.info("wide: %.0f s", time.perf_counter() - started)
    path.write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps(record, indent=2))
    if args.write_world:
        from demo_model import sizes as stage6

        stage6.write_world(args.model, drawn_sizes(record))
        print(f"{args.model / 'world.json'}: {stage6.sizes_in_words(drawn_sizes(record))}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
