"""`scripts/predict`: `cog predict` without Docker, against the real server on loopback."""

from __future__ import annotations

import difflib
import json
import mimetypes
import sys
from pathlib import Path
from typing import Any

from flux_lora import errors
from flux_lora.dev.cog_server import DEFAULT_PREDICTOR, CogServer, decode_data_uri, file_to_data_uri
from flux_lora.dev.openapi import schema_file
from flux_lora.models.layout import REPO_ROOT


def parse_inputs(pairs: list[str], schema: dict[str, Any]) -> dict[str, Any]:
    """`name=value` pairs typed by the schema's Input properties; `name=@path` sends a file."""
    properties = schema["components"]["schemas"]["Input"]["properties"]
    inputs: dict[str, Any] = {}
    for pair in pairs:
        name, sep, text = pair.partition("=")
        if not sep:
            raise SystemExit(f"-i {pair!r}: expected name=value")
        if name not in properties:
            nearest = difflib.get_close_matches(name, properties, n=1)
            hint = f"did you mean {nearest[0]}? " if nearest else ""
            raise SystemExit(f"-i {name}: unknown input; {hint}known inputs: {', '.join(properties)}")
        inputs[name] = _convert(name, text, _property(schema, name).get("type", "string"))
    return inputs


def _property(schema: dict[str, Any], name: str) -> dict[str, Any]:
    """An input's schema, its choices (`enum`) resolved from the component they live in."""
    components = schema["components"]["schemas"]
    prop = components["Input"]["properties"][name]
    if "allOf" in prop:
        return {**prop, **components[prop["allOf"][0]["$ref"].rsplit("/", 1)[1]]}
    return prop


# coglet words a failed prediction "Prediction failed: Prediction failed: InputError: <ours>"
# (the worker's prefix, its error type's, then the exception's type and text); say it once.
COGLET_PREFIX = "Prediction failed: "
OUR_ERRORS = {
    name for name, value in vars(errors).items() if isinstance(value, type) and issubclass(value, Exception)
}


def failure_text(body: dict[str, Any], schema: dict[str, Any]) -> str:
    """What went wrong, once: a 422's fields with the values they take, or our error's own text."""
    detail = body.get("detail")
    if isinstance(detail, list):  # coglet's 422: one entry per input it refused
        return "; ".join(_field_failure(item, schema) for item in detail)
    text = str(body.get("error") or detail or body)
    while text.startswith(COGLET_PREFIX):
        text = text[len(COGLET_PREFIX) :]
    kind, sep, rest = text.partition(": ")
    return rest if sep and kind in OUR_ERRORS else text


def _field_failure(item: dict[str, Any], schema: dict[str, Any]) -> str:
    name = str(item.get("loc", ["?"])[-1])
    message = f"{name}: {item.get('msg', item)}"
    if name not in schema["components"]["schemas"]["Input"]["properties"]:
        return message
    prop = _property(schema, name)  # coglet's message lists an input's choices, not its range
    if "minimum" in prop and "maximum" in prop:
        return f"{message}; {name} takes {prop['minimum']} to {prop['maximum']}"
    return message


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
        refused = isinstance(body.get("detail"), list)
        print(
            f"{'Invalid input' if refused else 'Prediction failed'}: {failure_text(body, schema)}",
            file=sys.stderr,
        )
        return 1
    print(body.get("logs", ""), file=sys.stderr, end="")
    for index, uri in enumerate(body["output"]):
        mime, data = decode_data_uri(uri)
        extension = (mimetypes.guess_extension(mime) or ".bin").replace(".jpeg", ".jpg")
        path = output_dir / f"out-{index}{extension}"
        path.write_bytes(data)
        print(path)
    return 0
