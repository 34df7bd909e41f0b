"""Inputs an attacker or a careless client sends, through the real server: each fails with a
message that names the input and the fix (never a bare Python error, never a secret), quickly, and
the next request is served as by a fresh container."""

from __future__ import annotations

import base64
import json
import re
import struct
import time

import pytest
import torch
from safetensors.torch import save

from flux_lora.dev.cog_server import CogServer
from flux_lora.lora.adapters import MAX_LORA_TENSORS
from tests.conftest import becomes_ready, output_images, predict_failed, predict_ok
from tests.lora.test_limits import bzip2_bomb

QUICK = {"prompt": "a cat", "num_inference_steps": 2, "megapixels": "0.25", "seed": 5}
RAW_ERRORS = ("RecursionError", "IndexError", "SafetensorError", "TypeError", "RuntimeError", "ValueError")


def data_uri(data: bytes) -> str:
    return "data:application/octet-stream;base64," + base64.b64encode(data).decode()


def header_only(header: bytes) -> bytes:
    return struct.pack("<Q", len(header)) + header


HOSTILE = {
    "a header nested 200,000 deep": (
        {"extra_lora": data_uri(header_only(b'{"a":' + b"[" * 200_000 + b"]" * 200_000 + b"}"))},
        "extra_lora: .*nested too deep",
    ),
    "an F4 tensor of 10^24 elements": (
        {"extra_lora": data_uri(header_only(json.dumps({"x": {"dtype": "F4", "shape": [10**12] * 2, "data_offsets": [0, 0]}}).encode()))},
        "extra_lora: .*has 0 bytes for its shape",
    ),
    "a LoRA with no FLUX keys": (
        {"extra_lora": data_uri(save({"foo.bar.weight": torch.zeros(2, 2)}))},
        "extra_lora: .*of no adapter type this container knows",
    ),
    "a LoRA of too many tensors": (
        {"replicate_weights": data_uri(save({f"transformer.b{i}.lora_A.weight": torch.zeros(1, 1) for i in range(MAX_LORA_TENSORS + 1)}))},
        f"replicate_weights: .*holds {MAX_LORA_TENSORS + 1} tensors",
    ),
    "half a LoRA": (
        {"extra_lora": data_uri(save({"transformer.single_transformer_blocks.0.proj_out.lora_A.weight": torch.zeros(2, 96)}))},
        "extra_lora: .*not a whole LoRA",
    ),
    "a seed below -2^63": ({"seed": -(2**63) - 1}, "seed: .*exact value is lost"),
    "a seed of 2^64": ({"seed": 2**64}, "seed: .*exact value is lost"),
    "an invalid IPv6 URL": ({"extra_lora": "https://[::1/x.safetensors"}, "extra_lora: .*not a valid URL"),
    "an image URL with a NUL byte": ({"image": "https://example.com/a\x00.png"}, "image: .*control character"),
    "a LoRA URL with a NUL byte": (
        {"extra_lora": "https://example.com/a\x00.safetensors"},
        "extra_lora: .*control character",
    ),
    "a bzip2 bomb": (
        {"replicate_weights": "data:application/x-tar;base64," + base64.b64encode(bzip2_bomb()).decode()},
        "replicate_weights: .*bzip2-compressed; only plain .tar files are read",
    ),
}  # fmt: skip


@pytest.mark.parametrize("name", HOSTILE)
def test_a_hostile_input_fails_precisely_and_quickly(server: CogServer, name: str):
    inputs, says = HOSTILE[name]
    started = time.monotonic()
    error = predict_failed(server, **{**QUICK, **inputs})
    assert time.monotonic() - started < 5.0  # the bzip2 bomb once held the slot for 889 s
    assert re.search(says, error), error
    assert not any(raw in error for raw in RAW_ERRORS), error
    assert becomes_ready(server)


def test_secrets_in_a_refused_image_stay_out_of_the_error_and_the_logs(server: CogServer):
    _, body = server.predict({**QUICK, "image": "ftp://me:hunter2@host/x.png?password=SECRET1#token=SECRET2"})
    assert body["status"] == "failed"
    shown = body["error"] + body["logs"]
    assert "ftp://***@host/x.png?password=***#token=***" in body["error"]
    assert not any(secret in shown for secret in ("hunter2", "SECRET1", "SECRET2"))


def test_whole_numbers_sent_as_floats_are_taken_as_integers(server: CogServer):
    as_floats = predict_ok(server, **{**QUICK, "num_outputs": 2.0, "num_inference_steps": 2.0, "seed": 5.0})
    assert output_images(as_floats) == output_images(predict_ok(server, **{**QUICK, "num_outputs": 2}))
