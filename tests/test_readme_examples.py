"""Every prediction the README shows, sent to the real server on the demo model as the README
writes it, and what each output draws read back by the demo world's checker: a new user who
follows the README gets the picture each prompt asks for, and no log line saying otherwise.

The README's first command also runs as a process of its own, as written
(tests/demo_model/test_architecture.py); here every example's inputs go through the same shared
server, so the whole README costs one setup."""

from __future__ import annotations

import json
import re
import shlex
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from demo_model import world
from flux_lora.dev.client import parse_inputs
from flux_lora.dev.cog_server import CogServer
from flux_lora.dev.openapi import schema_file
from flux_lora.models import layout
from tests.conftest import open_image, output_images, predict_ok, serving

REPO = layout.REPO_ROOT
README = REPO / "README.md"
SEED = 1  # for examples that leave the seed random: a test must not be a lottery
LORA_INPUTS = ("replicate_weights", "extra_lora")


@dataclass(frozen=True)
class Example:
    command: str  # as the README writes it, continuation lines joined
    env: dict[str, str]  # NAME=value words before the command
    inputs: dict[str, Any]


def commands(markdown: str) -> Iterator[str]:
    """Each command line of the bash blocks, with backslash continuations joined."""
    for block in re.findall(r"```bash\n(.*?)```", markdown, re.S):
        yield from re.sub(r"\\\n\s*", " ", block).splitlines()


def shell_words(text: str) -> list[str]:
    """The words bash makes of `text` in the repository root: quotes, and $(...) run."""
    done = subprocess.run(["bash", "-c", f"printf '%s\\0' {text}"], cwd=REPO, capture_output=True, check=True)
    return done.stdout.decode().split("\0")[:-1]


def examples(markdown: str) -> list[Example]:
    schema = json.loads(schema_file("predict.py:Predictor", REPO).read_text())
    found = []
    for command in commands(markdown):
        assignments, rest = re.match(r"((?:[A-Z_]+=\S+\s+)*)(.*)", command.strip()).groups()
        env = dict(word.split("=", 1) for word in shlex.split(assignments))
        # `cog predict` runs a built image, which holds real FLUX weights, never the demo model.
        if rest.startswith("./scripts/predict "):
            words = shell_words(rest)
            pairs = [words[i + 1] for i, word in enumerate(words) if word == "-i"]
            inputs = parse_inputs(pairs, schema)
        elif rest.startswith("curl ") and "/predictions" in rest and " -d " in rest:
            words = shell_words(rest)
            inputs = json.loads(words[words.index("-d") + 1])["input"]
        else:
            continue
        found.append(Example(command, env, inputs))
    return found


README_EXAMPLES = examples(README.read_text())


def test_the_readme_shows_every_kind_of_example():
    """The examples below cover txt2img, img2img, inpaint and a LoRA, over HTTP and from the
    command line; a README that lost one would pass them vacuously."""
    kinds = {
        ("image" in e.inputs, "mask" in e.inputs, bool(e.env.get("COG_WEIGHTS")), e.command.split()[0])
        for e in README_EXAMPLES
    }
    assert (False, False, False, "./scripts/predict") in kinds
    assert (False, False, False, "curl") in kinds
    assert (True, False, False, "./scripts/predict") in kinds
    assert (True, True, False, "./scripts/predict") in kinds
    assert any(image and curl == "curl" for image, _, _, curl in kinds)
    assert any(lora for _, _, lora, _ in kinds)


@pytest.fixture(scope="module")
def lora_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[CogServer]:
    """The demo model with its stripes LoRA as COG_WEIGHTS, for the examples that set it."""
    (weights,) = {e.env["COG_WEIGHTS"] for e in README_EXAMPLES if "COG_WEIGHTS" in e.env}
    folder = tmp_path_factory.mktemp("lora-server")
    with serving(layout.DEMO_MODEL_DIR, folder, COG_WEIGHTS=str(REPO / weights)) as cog:
        yield cog


@pytest.mark.parametrize("example", README_EXAMPLES, ids=lambda e: e.command[:70])
def test_each_readme_example_draws_what_its_prompt_asks(example: Example, request: pytest.FixtureRequest):
    server = request.getfixturevalue("lora_server" if "COG_WEIGHTS" in example.env else "demo_server")
    inputs = {"seed": SEED, **example.inputs}
    body = predict_ok(server, **inputs)
    scene = world.parse_prompt(inputs["prompt"])
    styled = "COG_WEIGHTS" in example.env or any(inputs.get(name) for name in LORA_INPUTS)
    images = output_images(body)
    assert len(images) == inputs.get("num_outputs", 1)
    for _, data in images:
        verdict = world.judge(open_image(data).convert("RGB"), scene)
        assert verdict.all_ok and verdict.striped == styled, (verdict, body["logs"])
    assert "Demo model:" not in body["logs"], body["logs"]  # inside its world and its sizes
    assert "not used" not in body["logs"], body["logs"]  # no input the request set goes unused


@pytest.mark.parametrize("page", ["README.md", "docs/development.md", "docs/behaviour.md", "demo/README.md"])
def test_the_example_files_exist(page: str):
    """Every `@file` an example sends, in the README and the pages it links, is in the repository."""
    for command in commands((REPO / page).read_text()):
        for path in re.findall(r"=@(\S+)", command) + re.findall(r"base64 -w0 (\S+?)\)", command):
            assert (REPO / path).is_file(), path


def test_sample_inputs_are_what_demo_model_inputs_writes(tmp_path: Path):
    """demo/inputs/ is reproducible: `python -m demo_model.inputs` writes the same pixels."""
    from demo_model import inputs

    written = inputs.write(tmp_path)
    for name, path in written.items():
        committed = open_image((inputs.INPUTS_DIR / path.name).read_bytes())
        assert committed.tobytes() == open_image(path.read_bytes()).tobytes(), name
