"""The trained demo model (demo/) behind the real server: what each mode draws, read back
by the synthetic world's checker. The random-model tests check sizes, bytes and equalities; these
catch a regression in txt2img, img2img, inpaint or LoRA application by what the picture shows.
Few scenes and few steps keep them fast; demo_model/quality.py measures every scene."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from demo_model import architecture, quality, world
from demo_model.world import Scene
from flux_lora.dev.cog_server import CogServer, bytes_to_data_uri
from flux_lora.dev.model_choice import model_dir_for_scripts
from flux_lora.models import layout
from flux_lora.schema import ASPECT_RATIOS, MEGAPIXELS
from tests.conftest import NO_SERVICES, image_data_uri, open_image, output_images, predict_ok

DEMO = layout.DEMO_MODEL_DIR
REPO = layout.REPO_ROOT
SIZE = architecture.IMAGE_SIZE
BASE = {
    "aspect_ratio": "custom",
    "width": SIZE,
    "height": SIZE,
    "output_format": "png",
    "guidance_scale": 3.5,
    "seed": 3,
}
STEPS = {"dev": 12, "schnell": 4}
# One of each shape; between them every colour and every background.
SCENES = (
    Scene("circle", "red", "blue"),
    Scene("square", "yellow", "black"),
    Scene("triangle", "green", "white"),
    Scene("cross", "blue", "white"),
)


def draw(server: CogServer, scene: Scene, model: str = "dev", **inputs) -> Image.Image:
    fields = {**BASE, "prompt": scene.prompt, "model": model, "num_inference_steps": STEPS[model], **inputs}
    ((mime, data),) = output_images(predict_ok(server, **fields))
    assert mime == "image/png"
    image = open_image(data).convert("RGB")
    assert image.size == (SIZE, SIZE)
    return image


def other(scene: Scene) -> Scene:
    """The same background, another shape and colour: what a wrong picture would show."""
    return quality.other_scene(scene, 0)


@pytest.mark.parametrize("model", ["dev", "schnell"])
def test_txt2img_draws_the_prompt(demo_server: CogServer, model: str):
    for scene in SCENES:
        image = draw(demo_server, scene, model)
        verdict = world.judge(image, scene)
        assert verdict.all_ok, (scene.prompt, verdict)
        assert not verdict.striped
        # The checker can say no: the same picture is not another scene's.
        assert not world.judge(image, other(scene)).all_ok


def test_img2img_keeps_the_input_outline(demo_server: CogServer):
    for index, scene in enumerate(SCENES):
        # Off-centre and resized, where the model left alone draws near the centre.
        source = world.render(scene, SIZE, rng=np.random.default_rng(100 + index))
        kept = draw(demo_server, scene, image=image_data_uri(source), prompt_strength=0.3)
        assert world.outline_overlap(source, kept) >= 0.85, scene.prompt
        assert world.judge(kept, scene).all_ok, scene.prompt
    # At full strength the input's pixels play no part: the outline is the model's own.
    redrawn = draw(demo_server, scene, image=image_data_uri(source), prompt_strength=1.0)
    assert world.outline_overlap(source, redrawn) < 0.85


def test_inpaint_repaints_the_mask_and_keeps_the_rest(demo_server: CogServer):
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(DEMO / "FLUX.1-dev" / "vae", torch_dtype=torch.float32)
    mask, inside, away = quality.inpaint_regions()
    # The schema's default strength keeps a fifth of the old picture in the box (its colour
    # blends in); at full strength the box is the new prompt's alone. The scenes on black are two
    # where the first 256 px VAE (a GroupNorm group for each outer channel) spread the box's
    # colour over the picture: 4.3 and 8.9 of 255 away from the box, against round trips of 3.6
    # and 3.9; the present one stays under 1.
    cases = (
        (Scene("triangle", "yellow", "black"), 1.0),
        (Scene("cross", "blue", "black"), 0.8),
        (SCENES[0], 1.0),
    )
    for index, (scene, strength) in enumerate(cases):
        source = world.render(scene, SIZE)
        target = other(scene)
        image = draw(
            demo_server,
            target,
            image=image_data_uri(source),
            mask=image_data_uri(mask),
            prompt_strength=strength,
        )
        reading = quality.inpaint_reading(vae, source, image, index, inside, away)
        assert reading["change"] > quality.MIN_CHANGE, target.prompt
        verdict = world.judge(image, target)
        assert verdict.background_ok and (verdict.colour_ok or strength < 1), (target.prompt, verdict)
        assert reading["rest"] <= reading["floor"], (target.prompt, reading)


def test_lora_turns_the_stripes_on_at_scale_1_and_off_at_0(demo_server: CogServer):
    lora = bytes_to_data_uri((DEMO / architecture.LORA_FILE).read_bytes(), "application/octet-stream")
    scene = SCENES[0]
    assert world.judge(draw(demo_server, scene, replicate_weights=lora, lora_scale=1.0), scene).striped
    assert not world.judge(draw(demo_server, scene, replicate_weights=lora, lora_scale=0.0), scene).striped
    # The second slot applies it too, and the plain model stays plain after both.
    styled = draw(demo_server, scene, extra_lora=lora, extra_lora_scale=1.0)
    assert world.judge(styled, scene).striped
    assert not world.judge(draw(demo_server, scene), scene).striped


def test_scripts_serve_the_demo_model_without_weights(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
):
    monkeypatch.delenv("FLUX_MODEL_DIR", raising=False)
    monkeypatch.setattr(layout, "DEFAULT_MODEL_DIR", tmp_path / "weights")
    assert model_dir_for_scripts() == DEMO
    notice = capsys.readouterr().err
    assert "trained demo model" in notice
    # the sizes it draws, as its world.json says (not a size written into the notice)
    assert f"at {json.loads((DEMO / 'world.json').read_text())['sizes_known']}." in notice
    # Without the demo model (a checkout that dropped it), the tiny random one, also said.
    assert model_dir_for_scripts(demo=tmp_path / "no-demo") == layout.TINY_MODEL_DIR
    assert "tiny random model" in capsys.readouterr().err


def test_the_readme_demo_command_draws_what_it_asks(tmp_path: Path):
    """The README's first command, as written (plus a seed: a test must not be a lottery), on a
    checkout without FLUX weights."""
    readme = (REPO / "README.md").read_text()
    command = next(line for line in readme.splitlines() if line.startswith("./scripts/predict "))
    env = {key: value for key, value in os.environ.items() if key != "FLUX_MODEL_DIR"}
    env.update(NO_SERVICES, FLUX_LORA_CACHE_DIR=str(tmp_path / "cache"))
    done = subprocess.run(
        [*shlex.split(command), "-i", "seed=1", "-o", str(tmp_path)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert "trained demo model" in done.stderr
    prompt = next(arg.split("=", 1)[1] for arg in shlex.split(command) if arg.startswith("prompt="))
    outputs = sorted(tmp_path.glob("out-*.webp"))
    assert len(outputs) == 2
    for path in outputs:
        assert world.judge(open_image(path.read_bytes()).convert("RGB"), world.parse_prompt(prompt)).all_ok


def test_the_committed_record_meets_its_targets():
    """quality.json is demo_model/quality.py's full run on the committed weights."""
    import json

    record = json.loads((DEMO / "quality.json").read_text())
    assert all(record["txt2img"][model]["all_ok"] >= 0.8 for model in ("dev", "schnell"))
    assert record["img2img"]["overlap_min"] >= 0.85
    assert record["inpaint"]["share_changed_over_20"] == 1.0
    # The rest of the picture within the VAE's round-trip error: 43 scenes of 44, the other
    # 0.2/255 past it (the table in demo/README.md).
    inpaint = record["inpaint"]
    assert inpaint["share_rest_within_round_trip"] >= 0.95
    assert inpaint["rest_error_mean"] < inpaint["vae_round_trip_error_mean"]
    for model in ("dev", "schnell"):  # 43/44 and 37/44 striped at scale 1 (demo/README.md)
        assert record["lora"][model]["striped_at_scale_1"] >= quality.DRAWN
        assert record["lora"][model]["striped_at_scale_0"] == 0.0
    # Stage 6: it draws 256x256 and every preset size at both megapixels, 11 scenes a size.
    from demo_model import sizes

    every_preset = {sizes.preset_size(ratio, mp) for ratio in ASPECT_RATIOS for mp in MEGAPIXELS}
    assert len(every_preset) == 22
    assert quality.drawn_sizes(record) == {(SIZE, SIZE), *every_preset}
    assert architecture.folder_size(DEMO) < 15_000_000


@pytest.mark.parametrize("size", [(1, 1), (16384, 16), (16, 16384)])
def test_an_image_too_small_or_narrow_to_draw_is_refused_naming_the_limit(demo_server: CogServer, size):
    """The demo model's VAE halves 5 times: scaled to fit 1440 px, these images would have a
    side under one packed latent (32 px). diffusers said `height and width must be > 0`."""
    image = image_data_uri(Image.new("RGB", size, (200, 40, 40)))
    status, body = demo_server.predict(
        {**BASE, "prompt": "a red circle on a blue background", "image": image}
    )
    assert status == 200 and body["status"] == "failed", body
    assert "image: scaled to fit 1440 px" in body["error"] and "at least 32 px a side" in body["error"]


def test_a_prompt_or_size_outside_the_demo_world_gets_one_log_line(demo_server: CogServer):
    """The demo model runs any prompt at any size, but draws only its world: the log says so."""
    outside = predict_ok(demo_server, **{**BASE, "prompt": "a TOK emoji of a cat", "num_inference_steps": 2})
    assert outside["logs"].count("Demo model: 'a TOK emoji of a cat' is outside what it knows") == 1
    assert "prompted like 'a red circle on a blue background'" in outside["logs"]
    odd_size = {**BASE, "width": 800, "height": 608, "num_inference_steps": 2}
    logs = predict_ok(demo_server, **odd_size, prompt=SCENES[0].prompt)["logs"]
    assert logs.count("Demo model: 800x608 is not a size it draws reliably") == 1, logs
    assert "outside what it knows" not in logs
    inside = predict_ok(
        demo_server, **{**BASE, "prompt": "TOK, " + SCENES[1].prompt, "num_inference_steps": 2}
    )
    assert "Demo model" not in inside["logs"], inside["logs"]


def test_world_json_matches_the_world_and_its_prompts():
    """The served model's world.json (flux_lora.models.world) says what demo_model.world draws."""
    from demo_model import sizes
    from flux_lora.models.world import ModelWorld

    known = ModelWorld.load(DEMO)
    assert known.shapes == world.SHAPES and known.colours == tuple(world.COLOURS)
    assert known.backgrounds == tuple(world.BACKGROUNDS)
    # The sizes it was measured drawing (quality.json), all of them sizes stage 6 trains.
    record = json.loads((DEMO / "quality.json").read_text())
    assert known.sizes == quality.drawn_sizes(record)
    assert known.sizes <= {size for group in sizes.GROUPS.values() for size in group.sizes}
    assert known.sizes_known == sizes.sizes_in_words(known.sizes)
    for scene in world.all_scenes():
        assert known.knows_prompt(scene.prompt) and known.knows_prompt(f"TOK {scene.prompt}, striped")
    for prompt in (
        "a TOK emoji of a cat",
        "a red circle",
        "a circle on a blue background",
        "a red square and a blue circle on a white background",
    ):
        assert not known.knows_prompt(prompt), prompt
        with pytest.raises(ValueError):
            world.parse_prompt(prompt)


def test_the_sizes_a_model_draws_are_said_in_the_schema_words():
    """world.json's sizes_known is what the server's log line and ./scripts/predict's notice say."""
    from demo_model import sizes

    every = {size for group in sizes.GROUPS.values() for size in group.sizes}
    assert len(every) == 23  # 256x256 and 11 presets at each megapixels choice
    assert sizes.sizes_in_words(every) == (
        "256x256 (aspect_ratio=custom, width=256, height=256); "
        "every aspect_ratio preset at megapixels=1 and 0.25"
    )
    tall_small = sizes.preset_size("9:21", "0.25")
    assert tall_small == (320, 768)
    assert sizes.sizes_in_words(every - {(SIZE, SIZE), tall_small}) == (
        "at megapixels=1 every aspect_ratio preset; "
        "at megapixels=0.25 1:1, 16:9, 21:9, 3:2, 2:3, 4:5, 5:4, 3:4, 4:3, 9:16"
    )
    assert sizes.sizes_in_words(set()) == "no size"
