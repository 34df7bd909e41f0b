"""The safety checkers, on the tiny random models with a concept planted to flag one chosen image.

The target is a real output of the server (lossless PNG); its CLIP embedding becomes concept 0 of
a copy of the checker, with a threshold halfway between the target's similarity (1.0) and that of
the closest other image, so exactly that image is flagged. The ViT second opinion is biased to
say "normal" or "nsfw" by its classifier head.
"""

from __future__ import annotations

import io
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from PIL import Image

from flux_lora.dev.cog_server import CogServer
from flux_lora.errors import ModelNotFoundError
from flux_lora.models.layout import NSFW_CLASSIFIER_DIR, SAFETY_CHECKER_DIR
from flux_lora.safety import SafetyChecker
from flux_lora.testing.checkers import NSFW_LABELS
from tests.conftest import NO_SERVICES, output_images, predict_failed, predict_ok

BATCH = {
    "prompt": "a cat",
    "num_inference_steps": 2,
    "megapixels": "0.25",
    "seed": 21,
    "output_format": "png",
}


@pytest.fixture(scope="module")
def batch(server: CogServer) -> list[bytes]:
    """Two outputs of one request, unfiltered; the first is the one we will plant."""
    body = predict_ok(server, **BATCH, num_outputs=2, disable_safety_checker=True)
    return [data for _, data in output_images(body)]


def embeddings(checker: SafetyChecker, images: list[Image.Image]) -> torch.Tensor:
    pixels = checker.checker_processor(images=images, return_tensors="pt").pixel_values
    with torch.no_grad():
        embeds = checker.checker.visual_projection(checker.checker.vision_model(pixels)[1])
    return torch.nn.functional.normalize(embeds, dim=-1)


def planted_model_dir(
    tiny_model_dir: Path, folder: Path, target: Image.Image, others: list[Image.Image], verdict: str
) -> Path:
    root = folder / "models"
    shutil.copytree(tiny_model_dir, root)
    checker = SafetyChecker.load(root, torch.device("cpu"), torch.float32)
    embeds = embeddings(checker, [target, *others])
    closest_other = float((embeds[1:] @ embeds[0]).max())
    assert 1.0 - closest_other > 0.004, "images too alike to plant one alone"
    with torch.no_grad():
        checker.checker.concept_embeds[0] = embeds[0]
        checker.checker.concept_embeds_weights[0] = (1.0 + closest_other) / 2
    checker.checker.save_pretrained(root / SAFETY_CHECKER_DIR)
    head = checker.classifier.classifier
    with torch.no_grad():
        head.weight.zero_()
        head.bias.copy_(torch.tensor([5.0 if NSFW_LABELS[i] == verdict else -5.0 for i in range(2)]))
    checker.classifier.save_pretrained(root / NSFW_CLASSIFIER_DIR)
    return root


def serve(model_dir: Path) -> CogServer:
    server = CogServer(
        env={"FLUX_MODEL_DIR": str(model_dir), "FLUX_LORA_CACHE_DIR": str(model_dir / "cache"), **NO_SERVICES}
    )
    assert server.start()["status"] == "READY"
    return server


@pytest.fixture(scope="module")
def strict_server(tiny_model_dir, batch, tmp_path_factory) -> Iterator[CogServer]:
    """Concept planted on output 0; the second opinion confirms ("nsfw")."""
    images = [Image.open(io.BytesIO(data)) for data in batch]
    root = planted_model_dir(tiny_model_dir, tmp_path_factory.mktemp("strict"), images[0], images[1:], "nsfw")
    with serve(root) as server:
        yield server


def test_random_checker_flags_nothing(server: CogServer, batch):
    body = predict_ok(server, **BATCH, num_outputs=2)
    assert [data for _, data in output_images(body)] == batch


def test_flagged_image_is_left_out_and_its_index_logged(strict_server: CogServer, batch):
    body = predict_ok(strict_server, **BATCH, num_outputs=2)
    assert [data for _, data in output_images(body)] == batch[1:]
    assert "Safety checker: output(s) 0 flagged and left out" in body["logs"]


def test_every_image_flagged_fails_with_what_to_do(strict_server: CogServer):
    error = predict_failed(strict_server, **BATCH, num_outputs=1)
    assert "flagged every generated image" in error and "Try another prompt or another seed" in error
    # The container stays healthy (the threshold is calibrated on this batch only: other noise
    # images of the random model can sit as close to the concept as the target).
    assert len(predict_ok(strict_server, **BATCH, num_outputs=2)["output"]) == 1


def test_disabled_checker_returns_everything(strict_server: CogServer, batch):
    body = predict_ok(strict_server, **BATCH, num_outputs=2, disable_safety_checker=True)
    assert [data for _, data in output_images(body)] == batch
    assert "Safety checker" not in body["logs"]


def test_second_opinion_of_normal_clears_the_image(tiny_model_dir, batch, tmp_path):
    images = [Image.open(io.BytesIO(data)) for data in batch]
    root = planted_model_dir(tiny_model_dir, tmp_path, images[0], images[1:], "normal")
    checker = SafetyChecker.load(root, torch.device("cpu"), torch.float32)
    assert checker.flagged_by_checker(images) == [0]
    assert checker.unsafe_indices(images) == []


def test_failing_second_opinion_counts_as_unsafe(tiny_model_dir, batch, tmp_path, monkeypatch, caplog):
    images = [Image.open(io.BytesIO(data)) for data in batch]
    root = planted_model_dir(tiny_model_dir, tmp_path, images[0], images[1:], "normal")
    checker = SafetyChecker.load(root, torch.device("cpu"), torch.float32)

    def broken(*args, **kwargs):
        raise RuntimeError("CUDA out of memory")

    monkeypatch.setattr(checker.classifier, "forward", broken)
    assert checker.unsafe_indices(images) == [0]
    assert "Safety second opinion failed (RuntimeError); the image counts as unsafe" in caplog.text


def test_missing_checkers_are_fetched_at_setup_and_fail_readably_when_they_cannot_be(
    tiny_model_dir, tmp_path
):
    root = tmp_path / "models"
    shutil.copytree(tiny_model_dir, root, ignore=shutil.ignore_patterns(NSFW_CLASSIFIER_DIR))
    with CogServer(env={"FLUX_MODEL_DIR": str(root), "HF_TOKEN": "", **NO_SERVICES}) as server:
        health = server.start()
        logs = health["setup"]["logs"]
        assert health["status"] == "SETUP_FAILED"
        # Public repos need no token, so setup tries; a failed setup reports only its error.
        assert f"{NSFW_CLASSIFIER_DIR} (Falconsai/nsfw_image_detection): could not be downloaded" in logs
        assert "http://127.0.0.1:9" in logs and "run again" in logs


def test_loading_without_checkers_names_the_fix(tiny_model_dir, tmp_path):
    root = tmp_path / "models"
    shutil.copytree(tiny_model_dir, root, ignore=shutil.ignore_patterns(NSFW_CLASSIFIER_DIR))
    with pytest.raises(
        ModelNotFoundError, match=f"The safety checkers are missing from {root}: {NSFW_CLASSIFIER_DIR}"
    ):
        SafetyChecker.load(root, torch.device("cpu"), torch.float32)
