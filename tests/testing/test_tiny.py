import json

from flux_lora.models.identical import same_files
from flux_lora.models.layout import RELEASES
from flux_lora.testing import tiny


def test_rebuilding_gives_identical_files(tmp_path, tiny_model_dir):
    rebuilt = tiny.build(tmp_path / "tiny")
    for release in RELEASES.values():
        assert same_files(rebuilt / release, tiny_model_dir / release)


def test_layout_matches_the_real_repos(tiny_model_dir):
    for release in RELEASES.values():
        folder = tiny_model_dir / release
        index = json.loads((folder / "model_index.json").read_text())
        assert index["_class_name"] == "FluxPipeline"
        for component in (
            "scheduler",
            "text_encoder",
            "text_encoder_2",
            "tokenizer",
            "tokenizer_2",
            "transformer",
            "vae",
        ):
            assert component in index and (folder / component).is_dir()
    dev = json.loads((tiny_model_dir / "FLUX.1-dev/transformer/config.json").read_text())
    schnell = json.loads((tiny_model_dir / "FLUX.1-schnell/transformer/config.json").read_text())
    assert dev["guidance_embeds"] is True and schnell["guidance_embeds"] is False


def test_tiny_model_is_small(tiny_model_dir):
    total = sum(path.stat().st_size for path in tiny_model_dir.rglob("*") if path.is_file())
    assert total < 5_000_000


def test_build_skips_a_complete_folder(tmp_path):
    root = tiny.build(tmp_path / "tiny")
    marker = root / "FLUX.1-dev" / "marker"
    marker.write_text("kept")
    tiny.build(root)
    assert marker.read_text() == "kept"
    tiny.build(root, force=True)
    assert not marker.exists()
