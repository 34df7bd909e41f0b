"""`./scripts/demo-quality` on the committed demo model, with one scene, few steps and the
smaller megapixels so it runs in seconds (the figures are not the point: demo/quality.json holds
the full run)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from demo_model import quality, world
from flux_lora.models.layout import DEMO_MODEL_DIR


@pytest.fixture
def one_scene_few_steps(monkeypatch: pytest.MonkeyPatch) -> None:
    first = world.all_scenes()[:1]
    monkeypatch.setattr(quality.world, "all_scenes", lambda: first)
    monkeypatch.setattr(quality, "STEPS", {"dev": 2, "schnell": 1})
    monkeypatch.setattr(quality, "MEGAPIXELS", {"0.25": 2})  # the 1 megapixel sizes take 4x longer


def test_a_wide_look_adds_its_sizes_to_the_record_and_keeps_the_rest(tmp_path: Path, one_scene_few_steps):
    record = tmp_path / "quality.json"
    before = {
        "sizes": {"scenes": 11, "seeds": 1, "1 MP": {"1:1 1024x1024": {"dev": 1.0, "schnell": 1.0}}},
        "wide": {"scenes": 44, "seeds": 2, "1 MP": {"9:21 640x1536": {"dev": 0.73, "schnell": 0.9}}},
    }
    record.write_text(json.dumps(before))

    argv = ["--model", str(DEMO_MODEL_DIR), "--record", str(record), "--part", "wide", "--ratios", "16:9"]
    argv += ["--threads", str(torch.get_num_threads())]  # main() sets the process's threads
    assert quality.main(argv) == 0

    after = json.loads(record.read_text())
    assert after["sizes"] == before["sizes"]  # the part that decides what is drawn is untouched
    wide = after["wide"]
    assert (wide["scenes"], wide["seeds"]) == (1, quality.WIDE_SEEDS)
    assert wide["1 MP"]["9:21 640x1536"] == {"dev": 0.73, "schnell": 0.9}  # looked at before
    assert list(wide["0.25 MP"]) == ["16:9 672x384"]
    # one scene with two seeds: each release's share is 0, one half or all
    assert all(share in (0.0, 0.5, 1.0) for share in wide["0.25 MP"]["16:9 672x384"].values())


@pytest.mark.parametrize(
    ("argv", "says"),
    [
        (["--part", "sizes", "--ratios", "9:21"], "--ratios: only --part wide looks at chosen sizes"),
        (["--part", "wide", "--write-world"], "--write-world: --part wide does not decide what is drawn"),
        (["--part", "wide", "--ratios", "9:20"], "invalid choice: '9:20'"),
    ],
)
def test_options_that_do_not_go_together_are_refused_before_loading(
    argv: list[str], says: str, tmp_path: Path, capsys: pytest.CaptureFixture
):
    record = tmp_path / "quality.json"
    with pytest.raises(SystemExit) as refused:
        quality.main(["--model", str(tmp_path / "no-model"), "--record", str(record), *argv])
    assert refused.value.code == 2
    assert says in capsys.readouterr().err
    assert not record.exists()
