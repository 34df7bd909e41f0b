"""Command line: `python -m flux_lora {openapi,predict,resolve-lora,build-tiny}`; see `--help`."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m flux_lora")
    commands = parser.add_subparsers(dest="command", required=True)
    openapi = commands.add_parser("openapi", help="write .cog/openapi_schema.json from predict.py")
    openapi.add_argument("--predictor", default="predict.py:Predictor", help="file.py:Class")
    openapi.add_argument("--output", type=Path, default=None, help="default: .cog/openapi_schema.json")
    openapi.add_argument("--check", action="store_true", help="fail if the file is out of date")
    predict = commands.add_parser("predict", help="run one prediction through the real server")
    predict.add_argument("-i", "--input", action="append", default=[], help="name=value or name=@file")
    predict.add_argument("-o", "--output", type=Path, default=Path("outputs"), help="folder for the images")
    predict.add_argument("--predictor", default="predict.py:Predictor", help="file.py:Class")
    resolve = commands.add_parser(
        "resolve-lora", help="show what a LoRA reference would fetch, fetching nothing"
    )
    resolve.add_argument(
        "reference", help="e.g. owner/model, huggingface.co/owner/repo, civitai.com/models/123"
    )
    tiny = commands.add_parser("build-tiny", help="build the tiny random FLUX model")
    tiny.add_argument("--output", type=Path, default=None, help="default: weights/tiny")
    tiny.add_argument("--force", action="store_true", help="rebuild even if present")
    args = parser.parse_args(argv)

    if args.command == "openapi":
        from flux_lora import openapi as schema

        module_file, class_name = args.predictor.split(":")
        sys.path.insert(0, str(Path(module_file).resolve().parent))
        text = schema.render(schema.build_schema(Path(module_file).stem, class_name))
        output = args.output or schema.SCHEMA_PATH
        if args.check:
            if not output.is_file() or output.read_text() != text:
                print(f"{output} is out of date: run `python -m flux_lora openapi`", file=sys.stderr)
                return 1
            return 0
        output.parent.mkdir(parents=True, exist_ok=True)
        output.write_text(text)
        print(output)
    elif args.command == "predict":
        from flux_lora.client import predict as run_prediction

        return run_prediction(args.input, args.output, args.predictor)
    elif args.command == "resolve-lora":
        from flux_lora.errors import InputError
        from flux_lora.lora_refs import describe, parse_lora_ref

        try:
            print(describe(parse_lora_ref(args.reference, "reference")))
        except InputError as err:
            print(err, file=sys.stderr)
            return 2
    elif args.command == "build-tiny":
        from flux_lora import models
        from flux_lora import tiny as tiny_model

        print(tiny_model.build(args.output or models.TINY_MODEL_DIR, force=args.force))
    return 0


if __name__ == "__main__":
    sys.exit(main())
