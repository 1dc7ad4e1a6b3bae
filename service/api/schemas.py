"""The API's single source of truth: request options, both request encodings, and the replies."""

from __future__ import annotations

import difflib
import re
from typing import Annotated, Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from service.core.errors import InvalidOption
from service.core.options import AUTO_SAMPLES_MAX, AUTO_SAMPLES_MIN, MAX_SEED, PolicyName

PolicyField = PolicyName
EncodingField = Literal["float", "base64"]
OptionsT = TypeVar("OptionsT", bound="ViewOptionsIn")


class ViewOptionsIn(BaseModel):
    """The options every endpoint that computes views shares: S (or auto S), policy, seed, model, deadline."""

    model_config = ConfigDict(strict=True, extra="forbid")

    samples: Annotated[int, Field(ge=1)] | Literal["auto"] | None = Field(
        None, description="S, views per image (default: the endpoint's); 'auto': the server picks S in "
                          "[samples_min, samples_max] from its current load, and the reply reports it")
    samples_min: Annotated[int, Field(ge=1, description="auto S: the least S to accept")] = AUTO_SAMPLES_MIN
    samples_max: Annotated[int, Field(ge=1, description="auto S: the most S (capped by the server's max_samples)")] \
        = AUTO_SAMPLES_MAX
    policy: PolicyField | None = Field(None, description="augmentation policy (default: the endpoint's)")
    seed: Annotated[int | None, Field(ge=0, le=MAX_SEED, description="drawn by the server if absent")] = None
    timeout_ms: Annotated[int | None, Field(ge=1, description="this request's deadline in ms (at most the "
                                                              "server's request_timeout_s)")] = None
    model: str | None = Field(None, description="model name (default: the server's default)")


class EmbedOptionsIn(ViewOptionsIn):
    """Options of POST /v1/embeddings (JSON-native types; multipart sends the same as strings)."""

    return_label_free_uncertainty: bool = Field(
        False, description="label_free_uncertainty per image: ‖m‖₁/‖m‖₂ of the mean embedding m, an uncertainty "
                           "score without any classifier head; higher = less certain")
    return_variance: bool = Field(False, description="per-dimension unbiased variance over the views (S >= 2)")
    normalize: bool = Field(False, description="L2-normalise the final mean")
    view_normalize: bool = Field(False, description="L2-normalise each view before averaging")
    return_dispersion: bool = Field(
        False, description="1 − mean pairwise cosine of the views: a label-free uncertainty score (S >= 2)")
    encoding: EncodingField = Field("float", description="base64: little-endian float32 strings")


class EmbeddingsJSONRequest(EmbedOptionsIn):
    images: list[str] = Field(
        description="base64 images (RFC 4648, padded); a data:image/...;base64, prefix is accepted",
        min_length=1,
    )


class OpenAIEmbeddingsRequest(EmbedOptionsIn):
    """OpenAI's body for POST /v1/embeddings (`input` instead of `images`); this service's options may ride along."""

    input: str | Annotated[list[str], Field(min_length=1)] = Field(
        description="one image or a list: data:image/...;base64, URLs or bare base64 (token arrays are refused)")
    encoding_format: EncodingField | None = Field(None, description="OpenAI's name for encoding (default float)")
    user: str | None = Field(None, description="accepted and ignored")
    dimensions: int | None = Field(None, description="refused when given: no trained truncation")


class EmbeddingData(BaseModel):
    index: int
    embedding: list[float] | str
    variance: list[float] | str | None = None
    dispersion: float | None = None
    label_free_uncertainty: float | None = None


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


class OpenAIEmbeddingData(EmbeddingData):
    object: Literal["embedding"] = "embedding"


class OpenAIUsage(Usage):
    prompt_tokens: int = 0  # images are not tokens
    total_tokens: int = 0


class OpenAIEmbeddingsResponse(EmbeddingsResponse):
    """The reply to OpenAI's request shape: this service's reply plus OpenAI's fields."""

    object: Literal["list"] = "list"
    data: list[OpenAIEmbeddingData]  # type: ignore[assignment]  # list is invariant; pydantic takes the narrower field
    usage: OpenAIUsage


class ClassifyOptionsIn(ViewOptionsIn):
    """Options of POST /v1/classify: the view options and how many classes to return."""

    top_k: Annotated[int, Field(ge=1, description="classes per image, most probable first (at most the head's "
                                                  "number of classes)")] = 5


class ClassifyJSONRequest(ClassifyOptionsIn):
    images: list[str] = Field(
        description="base64 images (RFC 4648, padded); a data:image/...;base64, prefix is accepted",
        min_length=1,
    )


class ClassLabel(BaseModel):
    class_index: int
    label: str = Field(description="the class name (ImageNet's for a 1,000-class head; else the index as text)")
    probability: float = Field(description="calibrated: softmax(head(mean embedding) / temperature)")


class ClassifyUncertainty(BaseModel):
    max_probability: float = Field(description="the top class's calibrated probability")
    entropy: float = Field(description="entropy of the calibrated distribution, in nats")
    dispersion: float | None = Field(description="1 − mean pairwise cosine of the views; null when S = 1")
    label_free_uncertainty: float = Field(
        description="the head-free score /v1/embeddings returns with return_label_free_uncertainty")


class ClassifyData(BaseModel):
    index: int
    labels: list[ClassLabel]
    uncertainty: ClassifyUncertainty


class ClassifyResponse(BaseModel):
    model: str
    model_fingerprint: str
    policy: PolicyField
    samples: int = Field(description="S used (for samples='auto': the S the server chose)")
    seed: int
    temperature: float = Field(description="the temperature applied to the logits (1 when uncalibrated)")
    calibrated: bool = Field(description="whether a temperature was fitted for this model, policy and S bucket")
    data: list[ClassifyData]
    usage: Usage


class ErrorBody(BaseModel):
    type: str
    message: str


class ErrorResponse(BaseModel):
    error: ErrorBody


class RequestLimits(BaseModel):
    """What one request may carry (clients split bigger jobs to fit)."""

    max_images: int
    max_body_bytes: int
    max_request_crops: int
    max_samples: int
    default_samples: int


class EndpointDefault(BaseModel):
    policy: PolicyField
    samples: int


class PairedDifference(BaseModel):
    diff: float = Field(description="this way of making views minus the central crop, on the same photos")
    lo: float = Field(description="lower end of the 95 % interval")
    hi: float = Field(description="upper end of the 95 % interval")


class VersusCenter(BaseModel):
    """Paired differences from the central crop; probabilities under a temperature fitted on the other half."""

    photos: int
    top1: PairedDifference = Field(description="top-1 accuracy, McNemar's exact interval")
    nll_calibrated: PairedDifference = Field(description="NLL, paired bootstrap interval")
    ece: PairedDifference = Field(description="expected calibration error, paired bootstrap interval")
    max_probability_auroc: PairedDifference = Field(description="AUROC of max_probability, paired bootstrap")


class PolicyFigures(BaseModel):
    """One row of the quality study: a way of making views, and what it gave each task."""

    views: str = Field(description="how the views were made, e.g. 'crop_flip S=8'")
    request: dict[str, Any] | None = Field(description="the request options that give these views (null: not "
                                                       "a single request)")
    top1: float = Field(description="classification: top-1 accuracy of the head on the mean (eq. 7)")
    nll: float = Field(description="classification: NLL, uncalibrated (T = 1)")
    nll_calibrated: float | None = Field(description="classification: NLL with the shipped temperature")
    ece: float | None = Field(description="classification: expected calibration error, cross-fitted temperature")
    max_probability_auroc: float | None = Field(
        None, description="classification: AUROC of max_probability for top-1 errors")
    recall_at_1: float | None = Field(description="near-duplicate retrieval: recall@1 of the L2-normalised mean")
    vs_center: VersusCenter | None = Field(None, description="classification: paired differences from the central "
                                                             "crop with 95 % intervals (none for the centre itself)")


class ModelCard(BaseModel):
    id: str = Field(description="OpenAI's field: the same as name")
    object: Literal["model"] = "model"
    created: int = Field(description="Unix time the server started")
    owned_by: str = "metta-serve"
    name: str
    dim: int
    default: bool
    fingerprint: str
    device: str
    dtype: str
    mode: str
    preprocess: dict[str, Any]
    decoding: dict[str, str] = Field(default_factory=dict, description="how images are decoded (part of the "
                                     "fingerprint): jpeg_decoder, color (ICC handling), scaling (reduced | full)")
    classifier: bool = Field(False, description="has a classifier head: /v1/classify works")
    defaults: dict[str, EndpointDefault] = Field(
        default_factory=dict, description="per endpoint: the policy and S a request gets when it does not say")
    policies: list[PolicyFigures] = Field(
        default_factory=list, description="what the quality study measured per policy on the sample photos "
                                          "(models/policy_quality.json; empty when this model was not measured)")
    limits: RequestLimits


class ModelsResponse(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


_BOOL_WORDS = {"true": True, "1": True, "false": False, "0": False}
_INT_RE = re.compile(r"[+-]?[0-9]{1,30}")  # ASCII digits only (\d would take "٣")


_INT_FIELDS = frozenset({"samples", "seed", "samples_min", "samples_max", "timeout_ms", "top_k"})


def parse_form_options(fields: dict[str, str], schema: type[OptionsT] = EmbedOptionsIn) -> OptionsT:  # type: ignore[assignment]
    """Multipart option strings → the same validated options as JSON (booleans: true/false/1/0)."""
    typed: dict[str, object] = {}
    for name, raw in fields.items():
        if name not in schema.model_fields:
            raise InvalidOption(unknown_option(name, schema))  # worded as in JSON requests
        kind = schema.model_fields[name].annotation
        text = raw.strip()
        if kind in (bool,):
            if text.lower() not in _BOOL_WORDS:
                raise InvalidOption(f"{name} must be true, false, 1 or 0, not {raw[:40]!r}")
            typed[name] = _BOOL_WORDS[text.lower()]
        elif name == "samples" and text == "auto":
            typed[name] = text
        elif name in _INT_FIELDS:
            if not _INT_RE.fullmatch(text):
                raise InvalidOption(f"{name} must be an integer, not {raw[:40]!r}")
            typed[name] = int(text)
        else:
            typed[name] = text
    return validate_options(typed, schema)


def validate_options(data: dict[str, object], schema: type[OptionsT] = EmbedOptionsIn) -> OptionsT:  # type: ignore[assignment]
    try:
        return schema.model_validate(data)
    except ValidationError as exc:
        raise InvalidOption(describe_validation_error(exc, schema)) from None


# Each endpoint's own options, to name the endpoint an option belongs to when another one is sent it.
_ENDPOINT_OPTIONS: dict[str, type[ViewOptionsIn]] = {"/v1/embeddings": EmbedOptionsIn,
                                                     "/v1/classify": ClassifyOptionsIn}


def unknown_option(name: str, schema: type[BaseModel]) -> str:
    """Why `schema` refuses the option `name`: one of another endpoint's options says whose it is."""
    owners = [path for path, options in _ENDPOINT_OPTIONS.items()
              if name in options.model_fields and not issubclass(schema, options)]
    if name in ViewOptionsIn.model_fields or not owners:
        # A near miss ("sample", "Seed", "return_varience") names the option meant.
        meant = difflib.get_close_matches(name.strip().lower(), schema.model_fields, n=1, cutoff=0.8)
        return f"{name}: unknown option" + (f"; did you mean {meant[0]!r}?" if meant else "")
    endpoint = "an embedding-only" if owners == ["/v1/embeddings"] else "a classify-only"
    return f"{name}: {endpoint} option (of {' and '.join(owners)}); this endpoint does not take it"


def describe_validation_error(exc: ValidationError, schema: type[BaseModel] | None = None) -> str:
    """One readable line per field, naming it: 'samples: Input should be greater than or equal to 1 or 'auto''.

    A field that may take several types (samples: int or "auto") gets one error per type from pydantic, each
    under a type tag ('samples.constrained-int'); they are merged under the field's own name.
    """
    problems: dict[str, list[str]] = {}
    for error in exc.errors(include_url=False):
        loc = error["loc"]  # the field first (a client's name, whatever its spelling), then any type tags
        where = ".".join(str(p) for p in loc[:1] + tuple(p for p in loc[1:] if not _is_type_tag(p))) or "body"
        if error["type"] == "extra_forbidden":
            message = unknown_option(str(loc[0]), schema or EmbedOptionsIn).partition(": ")[2]
        else:
            message = error["msg"]
        if problems.get(where) and message.startswith(_PYDANTIC_PREFIX):
            message = message.removeprefix(_PYDANTIC_PREFIX)  # '... greater than 0 or 'auto''
        problems.setdefault(where, []).append(message)
    return "; ".join(f"{where}: {' or '.join(messages)}" for where, messages in problems.items())


_PYDANTIC_PREFIX = "Input should be "


def _is_type_tag(part: int | str) -> bool:
    """pydantic's name for one member of a union ('constrained-int', "literal['auto']"), not a field or index."""
    return isinstance(part, str) and not part.isidentifier()


def openapi_request_body(json_request: type[BaseModel] = EmbeddingsJSONRequest,
                         options_in: type[BaseModel] = EmbedOptionsIn) -> dict[str, Any]:
    """Both encodings of a POST endpoint's body (default: /v1/embeddings), for the OpenAPI document."""
    json_schema = json_request.model_json_schema()
    options = options_in.model_json_schema()["properties"]
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
