from flux_lora.dev.cog_config import check_config, check_file
from flux_lora.models.layout import REPO_ROOT

REPO = REPO_ROOT


def test_our_cog_yaml_follows_the_rules():
    assert check_file(REPO / "cog.yaml") == []


def test_broken_example_is_rejected_for_each_mistake():
    problems = check_file(REPO_ROOT / "tests" / "data" / "broken-cog.yaml")
    expected = [
        "unknown key `build.cuda_version`",
        "`build.gpu` has the wrong type (str)",
        "build.python_version 3.8 is too old",
        "build.python_packages and build.python_requirements cannot both be set",
        "build.python_requirements: missing-requirements.txt does not exist",
        "set either `run` or `predict`",
        "`run: predict:Predictor` must have the form file.py:ClassName",
        "`predict: predict.py:Predictor`: predict.py does not exist",
    ]
    for fragment in expected:
        assert any(fragment in problem for problem in problems), (fragment, problems)
    assert len(problems) == len(expected), problems


def test_reference_must_name_an_existing_class():
    config = {"build": {"python_version": "3.11"}, "run": "predict.py:NoSuchRunner"}
    assert check_config(config, REPO) == [
        "`run: predict.py:NoSuchRunner`: predict.py defines no NoSuchRunner"
    ]


def test_missing_run_and_build_are_reported():
    problems = check_config({"image": "r8.im/me/model"}, REPO)
    assert "`build` is required and must be a mapping" in problems
    assert any(problem.startswith("`run` is missing") for problem in problems)
