"""`scripts/predict`: `cog predict` without Docker, against the real server on loopback."""

from __future__ import annotations

import json
import mimetypes
import sys
from pathlib import Path
from typing import Any

from flux_lora.dev.cog_server import DEFAULT_PREDICTOR, CogServer, decode_data_uri, file_to_data_uri
from flux_lora.dev.openapi import schema_file
from flux_lora.models.layout import REPO_ROOT


def parse_inputs(pairs: list[str], schema: dict[str, Any]) -> dict[str, Any]:
    """`name=value` pairs typed by the schema's Input properties; `name=@path` sends a file."""
    components = schema["components"]["schemas"]
    properties = components["Input"]["properties"]
    inputs: dict[str, Any] = {}
    for pair in pairs:
        name, sep, text = pair.partition("=")
        if not sep:
            raise SystemExit(f"-i {pair!r}: expected name=value")
        if name not in properties:
            raise SystemExit(f"-i {name}: unknown input; known inputs: {', '.join(properties)}")
        prop = properties[name]
        if "allOf" in prop:  # choices live in a component named by the reference
            prop = components[prop["allOf"][0]["$ref"].rsplit("/", 1)[1]]
        inputs[name] = _convert(name, text, prop.get("type", "string"))
    return inputs


def _convert(name: str, text: str, json_type: str) -> Any:
    if text.startswith("@"):
        path = Path(text[1:]).expanduser()
        if not path.is_file():
            raise SystemExit(f"-i {name}=@{path}: no such file")
        return file_to_data_uri(path)
    try:
        if json_type == "integer":
            return int(text)
        if json_type == "number":
            return float(text)
    except ValueError:
        raise SystemExit(f"-i {name}={text!r}: expected a {json_type}") from None
    if json_type == "boolean":
        if text.lower() not in {"true", "false"}:
            raise SystemExit(f"-i {name}={text!r}: expected true or false")
        return text.lower() == "true"
    return text


def predict(pairs: list[str], output_dir: Path, predictor: str = DEFAULT_PREDICTOR) -> int:
    """Run one prediction of `predictor`, its inputs typed by that predictor's committed schema."""
    path = schema_file(predictor, REPO_ROOT)
    if not path.is_file():
        raise SystemExit(
            f"--predictor {predictor}: no schema at {path}. Is it a predictor of that file? "
            "`python -m flux_lora openapi` writes one for each."
        )
    schema = json.loads(path.read_text())
    inputs = parse_inputs(pairs, schema)
    output_dir.mkdir(parents=True, exist_ok=True)
    with CogServer(predictor=predictor) as server:
        health = server.start()
        if health["status"] != "READY":
            print(
                f"Setup failed ({health['status']}):\n{health.get('setup', {}).get('logs', '')}",
                file=sys.stderr,
            )
            return 1
        status, body = server.predict(inputs)
    if status != 200 or body.get("status") != "succeeded":
        print(body.get("logs", ""), file=sys.stderr, end="")
        print(f"Prediction failed: {body.get('error') or body.get('detail')}", file=sys.stderr)
        return 1
    print(body.get("logs", ""), file=sys.stderr, end="")
    for index, uri in enumerate(body["output"]):
        mime, data = decode_data_uri(uri)
        extension = (mimetypes.guess_extension(mime) or ".bin").replace(".jpeg", ".jpg")
        path = output_dir / f"out-{index}{extension}"
        path.write_bytes(data)
        print(path)
    return 0
