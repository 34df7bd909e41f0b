"""The OpenAPI document `cog build` would write to `.cog/openapi_schema.json`, for each predictor.

coglet (cog 0.23) validates inputs and serves `/openapi.json` only when that file exists, and the
Go CLI that writes it cannot be installed here, so we generate it from the predictor with cog's
own runtime inspector, following the CLI's conventions: inputs in `x-order`, titles from names,
choices as `allOf` references to a component per input, optional inputs `nullable`.

`predict.py` holds several predictors: the canonical `Predictor`, whose schema is
`.cog/openapi_schema.json` (the file coglet and `cog build` use), and variants that reproduce
older versions of the model, each committed at `.cog/schemas/<Class>.json`. Those older versions
show their choices inline: a predictor class that sets `inline_enums = True` gets `type` and `enum`
on the input itself and no component, as on their pages. Inputs named in a predictor's
`url_inputs` are strings shown as `format: uri`, as cog shows a `Path` (which they are not, so
that cog leaves their download to us).
"""

from __future__ import annotations

import importlib
import inspect
import json
from pathlib import Path
from typing import Any

SCHEMA_PATH = Path(".cog") / "openapi_schema.json"
VARIANT_SCHEMA_DIR = Path(".cog") / "schemas"
CANONICAL = "Predictor"
INLINE_ENUMS = "inline_enums"  # the class attribute that asks for inline choices
URL_INPUTS = "url_inputs"  # the class attribute naming string inputs shown as `format: uri`


def schema_path(class_name: str) -> Path:
    """Where a predictor's schema is committed, relative to the folder of its file."""
    return SCHEMA_PATH if class_name in ("", CANONICAL) else VARIANT_SCHEMA_DIR / f"{class_name}.json"


def schema_file(predictor: str, base: Path) -> Path:
    """The committed schema of `predictor` (`file.py:Class`, the file relative to `base`)."""
    module_file, _, class_name = predictor.partition(":")
    return (base / module_file).resolve().parent / schema_path(class_name)


def predictor_classes(module: str) -> list[str]:
    """The predictors `module` defines: its runner classes with a `run` of their own, in file order."""
    from cog import BaseRunner

    loaded = importlib.import_module(module)
    found = [
        value
        for value in vars(loaded).values()
        if inspect.isclass(value)
        and value.__module__ == loaded.__name__
        and issubclass(value, BaseRunner)
        and "run" in vars(value)
    ]
    return [cls.__name__ for cls in sorted(found, key=lambda cls: inspect.getsourcelines(cls)[1])]


def build_schema(module: str, class_name: str) -> dict[str, Any]:
    from cog import _inspector

    info = _inspector.create_predictor(module, class_name)
    predictor = getattr(importlib.import_module(module), class_name)
    inline_enums = bool(getattr(predictor, INLINE_ENUMS, False))
    url_inputs = set(getattr(predictor, URL_INPUTS, ()))
    inputs: dict[str, Any] = {}
    enums: dict[str, Any] = {}
    required = []
    for name, field in info.inputs.items():
        prop: dict[str, Any] = {"x-order": field.order}
        if field.choices is not None and not inline_enums:
            prop["allOf"] = [{"$ref": f"#/components/schemas/{name}"}]
            enums[name] = {
                "title": name,
                "description": "An enumeration.",
                "enum": field.choices,
                **field.type.primitive.json_type(),
            }
        else:
            prop["title"] = name.replace("_", " ").title()
            prop.update(field.type.json_type())
            if name in url_inputs:
                prop["format"] = "uri"
            if field.choices is not None:
                prop["enum"] = field.choices
        optional = field.type.repetition.name == "OPTIONAL"
        if field.default is not None:
            prop["default"] = field.type.json_encode(field.default)
        elif not optional:
            required.append(name)
        if optional:
            prop["nullable"] = True
        if field.description is not None:
            prop["description"] = field.description
        if field.ge is not None:
            prop["minimum"] = _number(field.ge)
        if field.le is not None:
            prop["maximum"] = _number(field.le)
        inputs[name] = prop

    input_schema: dict[str, Any] = {"title": "Input", "type": "object", "properties": inputs}
    if required:
        input_schema["required"] = required
    return _document(input_schema, info.output.json_type(), enums)


def render(schema: dict[str, Any]) -> str:
    return json.dumps(schema, indent=2, ensure_ascii=False) + "\n"


def _number(value: float) -> int | float:
    return int(value) if float(value).is_integer() else value


def _document(input_schema: dict, output_schema: dict, enums: dict) -> dict[str, Any]:
    def json_response(schema: dict) -> dict:
        return {"description": "Successful Response", "content": {"application/json": {"schema": schema}}}

    validation_error = {
        "description": "Validation Error",
        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/HTTPValidationError"}}},
    }
    timestamp = {"type": "string", "format": "date-time"}
    return {
        "openapi": "3.0.2",
        "info": {"title": "Cog", "version": "0.1.0"},
        "paths": {
            "/": {
                "get": {
                    "summary": "Root",
                    "operationId": "root__get",
                    "responses": {"200": json_response({})},
                }
            },
            "/health-check": {
                "get": {
                    "summary": "Healthcheck",
                    "operationId": "healthcheck_health_check_get",
                    "responses": {"200": json_response({})},
                }
            },
            "/predictions": {
                "post": {
                    "summary": "Predict",
                    "description": "Run a single prediction on the model",
                    "operationId": "predict_predictions_post",
                    "requestBody": {
                        "content": {
                            "application/json": {"schema": {"$ref": "#/components/schemas/PredictionRequest"}}
                        }
                    },
                    "responses": {
                        "200": json_response({"$ref": "#/components/schemas/PredictionResponse"}),
                        "422": validation_error,
                    },
                }
            },
            "/predictions/{prediction_id}/cancel": {
                "post": {
                    "summary": "Cancel",
                    "operationId": "cancel_predictions__prediction_id__cancel_post",
                    "parameters": [
                        {
                            "required": True,
                            "schema": {"title": "Prediction Id", "type": "string"},
                            "name": "prediction_id",
                            "in": "path",
                        }
                    ],
                    "responses": {"200": json_response({}), "422": validation_error},
                }
            },
        },
        "components": {
            "schemas": {
                "Input": input_schema,
                "Output": output_schema,
                **enums,
                "PredictionRequest": {
                    "title": "PredictionRequest",
                    "type": "object",
                    "properties": {
                        "id": {"title": "Id", "type": "string"},
                        "input": {"$ref": "#/components/schemas/Input"},
                    },
                },
                "PredictionResponse": {
                    "title": "PredictionResponse",
                    "type": "object",
                    "properties": {
                        "input": {"$ref": "#/components/schemas/Input"},
                        "output": {"$ref": "#/components/schemas/Output"},
                        "id": {"title": "Id", "type": "string"},
                        "version": {"title": "Version", "type": "string"},
                        "created_at": {"title": "Created At", **timestamp},
                        "started_at": {"title": "Started At", **timestamp},
                        "completed_at": {"title": "Completed At", **timestamp},
                        "status": {"title": "Status", "type": "string"},
                        "error": {"title": "Error", "type": "string"},
                        "logs": {"title": "Logs", "type": "string"},
                        "metrics": {"title": "Metrics", "type": "object"},
                    },
                },
                "HTTPValidationError": {
                    "title": "HTTPValidationError",
                    "type": "object",
                    "properties": {
                        "detail": {
                            "title": "Detail",
                            "type": "array",
                            "items": {"$ref": "#/components/schemas/ValidationError"},
                        }
                    },
                },
                "ValidationError": {
                    "title": "ValidationError",
                    "required": ["loc", "msg", "type"],
                    "type": "object",
                    "properties": {
                        "loc": {
                            "title": "Location",
                            "type": "array",
                            "items": {"anyOf": [{"type": "string"}, {"type": "integer"}]},
                        },
                        "msg": {"title": "Message", "type": "string"},
                        "type": {"title": "Error Type", "type": "string"},
                    },
                },
            }
        },
    }
