"""Command line: `python -m flux_lora {openapi,predict,inspect,resolve-lora,model-dir,build-tiny}`;
see `--help`."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m flux_lora")
    commands = parser.add_subparsers(dest="command", required=True)
    openapi = commands.add_parser(
        "openapi",
        help="write the schema of every predictor in predict.py: .cog/openapi_schema.json for "
        "Predictor, .cog/schemas/<Class>.json for the others",
    )
    openapi.add_argument(
        "--predictor", default="predict.py", help="file.py (every predictor in it) or file.py:Class (one)"
    )
    openapi.add_argument("--output", type=Path, default=None, help="with file.py:Class: write here instead")
    openapi.add_argument("--check", action="store_true", help="fail if a schema file is out of date")
    predict = commands.add_parser("predict", help="run one prediction through the real server")
    predict.add_argument("-i", "--input", action="append", default=[], help="name=value or name=@file")
    predict.add_argument("-o", "--output", type=Path, default=Path("outputs"), help="folder for the images")
    predict.add_argument("--predictor", default="predict.py:Predictor", help="file.py:Class")
    inspect = commands.add_parser(
        "inspect",
        help="load what the server would load (same environment) and report every module: device, "
        "parameters by dtype, bytes; exit 1 if a module is not in the serving dtype",
    )
    inspect.add_argument(
        "--exercise", action="store_true", help="first run one small request down every serving path"
    )
    inspect.add_argument("--json", action="store_true", help="print the report as JSON")
    resolve = commands.add_parser(
        "resolve-lora",
        help="show what a LoRA reference would fetch, fetching nothing; with --file, a local "
        "file's layout, adapter type and the transformer layers it touches",
    )
    resolve.add_argument(
        "reference", nargs="?", help="e.g. owner/model, huggingface.co/owner/repo, civitai.com/models/123"
    )
    resolve.add_argument(
        "--file", type=Path, help="instead: a local .safetensors file's layout, adapter type and layers"
    )
    commands.add_parser(
        "model-dir",
        help="print the folder the scripts serve: the weights, else the demo model (or the tiny one)",
    )
    tiny = commands.add_parser("build-tiny", help="build the tiny random FLUX model")
    tiny.add_argument("--output", type=Path, default=None, help="default: weights/tiny")
    tiny.add_argument("--force", action="store_true", help="rebuild even if present")
    args = parser.parse_args(argv)

    if args.command == "openapi":
        if args.output and ":" not in args.predictor:
            parser.error("--output needs --predictor file.py:Class")
        return _openapi(args.predictor, args.output, args.check)
    elif args.command == "predict":
        from flux_lora.dev.client import predict as run_prediction

        return run_prediction(args.input, args.output, args.predictor)
    elif args.command == "inspect":
        return _inspect(args.exercise, args.json)
    elif args.command == "resolve-lora":
        from flux_lora.errors import InputError
        from flux_lora.lora.refs import describe, parse_lora_ref

        if (args.reference is None) == (args.file is None):
            parser.error("resolve-lora takes a reference or --file FILE")
        try:
            if args.file is not None:
                from flux_lora.lora.report import describe_file

                if not args.file.is_file():
                    parser.error(f"--file {args.file}: no such file")
                print(describe_file(str(args.file)))
            else:
                print(describe(parse_lora_ref(args.reference, "reference")))
        except InputError as err:
            print(err, file=sys.stderr)
            return 2
    elif args.command == "model-dir":
        from flux_lora.dev.model_choice import model_dir_for_scripts

        print(model_dir_for_scripts())
    elif args.command == "build-tiny":
        from flux_lora.models import layout
        from flux_lora.testing import tiny as tiny_model

        print(tiny_model.build(args.output or layout.TINY_MODEL_DIR, force=args.force))
    return 0


def _inspect(exercise: bool, as_json: bool) -> int:
    """Set up as the server does (the scripts' model folder, COG_WEIGHTS and every FLUX_LORA_*
    setting), optionally exercise every path, then report what is held."""
    import json
    import logging
    import os

    from flux_lora.dev.model_choice import model_dir_for_scripts
    from flux_lora.device import inventory

    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(message)s")
    os.environ["FLUX_MODEL_DIR"] = str(model_dir_for_scripts())
    from flux_lora.service import FluxLoraService

    service = FluxLoraService.setup(os.environ.get("COG_WEIGHTS") or None)
    exercised = None
    if exercise:
        from flux_lora.dev import exercise as paths

        exercised = paths.run(service)
    report = inventory.report(service)
    if exercised is not None:
        report["exercised"] = exercised
    print(json.dumps(report, indent=2) if as_json else inventory.render(report))
    return 1 if report["faults"] else 0


def _openapi(predictor: str, output: Path | None, check: bool) -> int:
    """Write (or with `check`, compare) the schema file of each predictor `predictor` names."""
    from flux_lora.dev import openapi as schema

    module_file, _, class_name = predictor.partition(":")
    folder = Path(module_file).resolve().parent
    sys.path.insert(0, str(folder))
    module = Path(module_file).stem
    targets = {
        name: output or folder / schema.schema_path(name)
        for name in ([class_name] if class_name else schema.predictor_classes(module))
    }
    stale = []
    for name, path in targets.items():
        text = schema.render(schema.build_schema(module, name))
        if not check:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
            print(path)
        elif not path.is_file() or path.read_text() != text:
            stale.append(f"{path} is out of date")
    if not class_name:  # a schema left behind by a predictor that is gone
        for path in sorted((folder / schema.VARIANT_SCHEMA_DIR).glob("*.json")):
            if path not in targets.values():
                stale.append(f"{path} belongs to no predictor in {module_file}: remove it")
    if stale:
        print("\n".join(stale) + "\nRun `python -m flux_lora openapi`.", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
