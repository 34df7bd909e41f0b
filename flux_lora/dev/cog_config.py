"""A checker for the cog.yaml rules of cog 0.23, since its Go CLI cannot be installed here.

It encodes the CLI's config schema (known top-level and `build` keys and their types) and the
checks `cog build` makes before building: Python 3.10 or newer, a `file.py:Class` reference
that points at a class that exists, a requirements file that exists.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path
from typing import Any

TOP_LEVEL_KEYS = {
    "build": dict,
    "image": str,
    "predict": str,
    "run": str,
    "train": str,
    "concurrency": dict,
    "environment": list,
    "tests": list,
    "weights": list,
}
BUILD_KEYS = {
    "cuda": str,
    "cudnn": str,
    "gpu": bool,
    "python_version": (str, float),
    "python_packages": list,
    "python_requirements": str,
    "python_overrides": str,
    "pre_install": list,
    "system_packages": list,
    "run": list,
    "fast": bool,
    "environment": list,
    "sdk_version": str,
}
MIN_PYTHON = (3, 10)
REFERENCE = re.compile(r"^(?P<file>[\w./-]+\.py):(?P<name>[A-Za-z_]\w*)$")


def check_file(path: Path) -> list[str]:
    """Every rule the file at `path` breaks, as readable sentences (empty when valid)."""
    import yaml

    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        return [f"{path.name} is not valid YAML: {err}"]
    return check_config(data, path.parent)


def check_config(data: Any, root: Path) -> list[str]:
    if not isinstance(data, dict):
        return ["cog.yaml must be a mapping of keys to values"]
    problems = _check_keys(data, TOP_LEVEL_KEYS, "")
    build = data.get("build")
    if not isinstance(build, dict):
        problems.append("`build` is required and must be a mapping")
        build = {}
    problems += _check_keys(build, BUILD_KEYS, "build.")

    version = str(build.get("python_version", ""))
    match = re.fullmatch(r"(\d+)\.(\d+)(\.\d+)?", version)
    if not match:
        problems.append(f"build.python_version {version!r} must look like 3.11 or 3.11.7")
    elif (int(match[1]), int(match[2])) < MIN_PYTHON:
        problems.append(f"build.python_version {version} is too old: cog 0.23 needs 3.10 or newer")

    if "python_packages" in build and "python_requirements" in build:
        problems.append("build.python_packages and build.python_requirements cannot both be set")
    requirements = build.get("python_requirements")
    if isinstance(requirements, str) and not (root / requirements).is_file():
        problems.append(f"build.python_requirements: {requirements} does not exist")

    if "run" in data and "predict" in data:
        problems.append("set either `run` or `predict` (its older name), not both")
    for key in ("run", "predict", "train"):
        if isinstance(data.get(key), str):
            problems += _check_reference(key, data[key], root)
    if "run" not in data and "predict" not in data:
        problems.append("`run` is missing: point it at the runner, e.g. run: predict.py:Predictor")
    return problems


def _check_keys(mapping: dict, known: dict[str, Any], prefix: str) -> list[str]:
    problems = []
    for key, value in mapping.items():
        if key not in known:
            problems.append(f"unknown key `{prefix}{key}` (known: {', '.join(sorted(known))})")
        elif value is not None and not isinstance(value, known[key]):
            problems.append(f"`{prefix}{key}` has the wrong type ({type(value).__name__})")
    return problems


def _check_reference(key: str, reference: str, root: Path) -> list[str]:
    match = REFERENCE.match(reference)
    if not match:
        return [f"`{key}: {reference}` must have the form file.py:ClassName"]
    source = root / match["file"]
    if not source.is_file():
        return [f"`{key}: {reference}`: {match['file']} does not exist"]
    tree = ast.parse(source.read_text(), filename=str(source))
    names = {node.name for node in tree.body if isinstance(node, (ast.ClassDef, ast.FunctionDef))}
    if match["name"] not in names:
        return [f"`{key}: {reference}`: {match['file']} defines no {match['name']}"]
    return []
