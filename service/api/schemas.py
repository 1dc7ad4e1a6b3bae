"""The API's single source of truth: request options, both request encodings, and the replies."""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from service.core.errors import InvalidOption
from service.core.options import MAX_SEED, PolicyName

PolicyField = PolicyName
EncodingField = Literal["float", "base64"]


class EmbedOptionsIn(BaseModel):
    """Options of POST /v1/embeddings (JSON-native types; multipart sends the same as strings)."""

    model_config = ConfigDict(strict=True, extra="forbid")

    samples: Annotated[int | None, Field(ge=1, description="S, views per image (default: the server's)")] = None
    policy: PolicyField | None = Field(None, description="augmentation policy (default: the server's)")
    seed: Annotated[int | None, Field(ge=0, le=MAX_SEED, description="drawn by the server if absent")] = None
    return_variance: bool = Field(False, description="per-dimension unbiased variance over the views (S >= 2)")
    normalize: bool = Field(False, description="L2-normalise the final mean")
    view_normalize: bool = Field(False, description="L2-normalise each view before averaging")
    return_dispersion: bool = Field(
        False, description="1 − mean pairwise cosine of the views: a label-free uncertainty score (S >= 2)")
    encoding: EncodingField = Field("float", description="base64: little-endian float32 strings")
    model: str | None = Field(None, description="model name (default: the server's default)")


class EmbeddingsJSONRequest(EmbedOptionsIn):
    images: list[str] = Field(
        description="base64 images (RFC 4648, padded); a data:image/...;base64, prefix is accepted",
        min_length=1,
    )


class EmbeddingData(BaseModel):
    index: int
    embedding: list[float] | str
    variance: list[float] | str | None = None
    dispersion: float | None = None


class Usage(BaseModel):
    images: int
    crops: int


class EmbeddingsResponse(BaseModel):
    model: str
    model_fingerprint: str
    dim: int
    policy: PolicyField
    samples: int
    seed: int
    data: list[EmbeddingData]
    usage: Usage


class ErrorBody(BaseModel):
    type: str
    message: str


class ErrorResponse(BaseModel):
    error: ErrorBody


class ModelCard(BaseModel):
    name: str
    dim: int
    default: bool
    fingerprint: str
    device: str
    dtype: str
    mode: str
    preprocess: dict[str, Any]


class ModelsResponse(BaseModel):
    data: list[ModelCard]


_BOOL_WORDS = {"true": True, "1": True, "false": False, "0": False}
_INT_RE = re.compile(r"[+-]?[0-9]{1,30}")  # ASCII digits only (\d would take "٣")


def parse_form_options(fields: dict[str, str]) -> EmbedOptionsIn:
    """Multipart option strings → the same validated options as JSON (booleans: true/false/1/0)."""
    typed: dict[str, object] = {}
    for name, raw in fields.items():
        if name not in EmbedOptionsIn.model_fields:
            raise InvalidOption(f"unknown option {name!r}")
        kind = EmbedOptionsIn.model_fields[name].annotation
        text = raw.strip()
        if kind in (bool,):
            if text.lower() not in _BOOL_WORDS:
                raise InvalidOption(f"{name} must be true, false, 1 or 0, not {raw[:40]!r}")
            typed[name] = _BOOL_WORDS[text.lower()]
        elif name in ("samples", "seed"):
            if not _INT_RE.fullmatch(text):
                raise InvalidOption(f"{name} must be an integer, not {raw[:40]!r}")
            typed[name] = int(text)
        else:
            typed[name] = text
    return validate_options(typed)


def validate_options(data: dict[str, object]) -> EmbedOptionsIn:
    try:
        return EmbedOptionsIn.model_validate(data)
    except ValidationError as exc:
        raise InvalidOption(describe_validation_error(exc)) from None


def describe_validation_error(exc: ValidationError) -> str:
    """One readable line per problem, naming the field: 'samples: Input should be ...'."""
    parts = []
    for error in exc.errors(include_url=False):
        where = ".".join(str(p) for p in error["loc"]) or "body"
        message = error["msg"]
        if error["type"] == "extra_forbidden":
            message = "unknown option"
        parts.append(f"{where}: {message}")
    return "; ".join(parts)


def openapi_request_body() -> dict[str, Any]:
    """Both encodings of POST /v1/embeddings, for the OpenAPI document."""
    json_schema = EmbeddingsJSONRequest.model_json_schema()
    options = EmbedOptionsIn.model_json_schema()["properties"]
    form_properties: dict[str, Any] = {
        "images": {"type": "array", "items": {"type": "string", "format": "binary"}, "minItems": 1},
    }
    for name, schema in options.items():
        form_properties[name] = _form_field(schema)
    return {
        "required": True,
        "content": {
            "application/json": {"schema": json_schema},
            "multipart/form-data": {
                "schema": {"type": "object", "properties": form_properties, "required": ["images"]},
            },
        },
    }


def _form_field(schema: dict[str, Any]) -> dict[str, Any]:
    """A JSON option's schema as a form field: no default, and no null (a form omits the field instead)."""
    field = {k: v for k, v in schema.items() if k not in ("default", "anyOf")}
    alternatives = [s for s in schema.get("anyOf", []) if s.get("type") != "null"]
    if len(alternatives) == 1:
        field.update(alternatives[0])
    elif alternatives:
        field["anyOf"] = alternatives
    if field.get("type") == "boolean":  # a form may also spell it as the digits parse_form_options takes
        del field["type"]
        digits = sorted(int(word) for word in _BOOL_WORDS if word.isdigit())
        field["anyOf"] = [{"type": "boolean"}, {"type": "integer", "enum": digits}]
    return field
