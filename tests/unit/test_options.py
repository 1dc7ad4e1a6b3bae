"""Option parsing at the door: any input gives valid options or InvalidOption (422), never anything else."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from service.api.schemas import EmbedOptionsIn, openapi_request_body, parse_form_options, validate_options
from service.core.errors import InvalidOption
from service.core.options import MAX_SEED

OPTION_NAMES = sorted(EmbedOptionsIn.model_fields)
# Strings near the interesting edges: numbers of every size and sign, floats, words, whitespace, unicode.
EDGY_TEXT = st.one_of(
    st.text(max_size=40),
    st.integers(min_value=-(2**80), max_value=2**80).map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(str),
    st.sampled_from(["", " ", "true", "FALSE", "1", "0", "maybe", "yes", "null", "None", "+7", "-0", "1e3", "0x10",
                     "٣", "𝟘", "1_000", " 42 ", "center", "crop_flip", "multiscale", "float", "base64", "dummy"]),
)
JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(min_value=-(2**80), max_value=2**80) | st.floats() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=6,
)


def _check_valid(options: EmbedOptionsIn) -> None:
    assert options.samples is None or (isinstance(options.samples, int) and options.samples >= 1)
    assert options.seed is None or (isinstance(options.seed, int) and 0 <= options.seed <= MAX_SEED)
    assert options.policy in (None, "center", "crop_flip", "multiscale")
    assert options.encoding in ("float", "base64")
    assert all(isinstance(getattr(options, name), bool) for name in ("return_variance", "normalize",
                                                                       "view_normalize"))


@settings(max_examples=400, deadline=None)
@given(st.dictionaries(st.sampled_from(OPTION_NAMES) | st.text(max_size=12), EDGY_TEXT, max_size=6))
def test_any_form_fields_give_valid_options_or_invalid_option(fields: dict[str, str]) -> None:
    try:
        options: EmbedOptionsIn = parse_form_options(fields)
    except InvalidOption as exc:
        assert exc.status == 422 and exc.message
        return
    _check_valid(options)


@settings(max_examples=400, deadline=None)
@given(st.dictionaries(st.sampled_from(OPTION_NAMES) | st.text(max_size=12), JSON_VALUES, max_size=6))
def test_any_json_values_give_valid_options_or_invalid_option(data: dict[str, object]) -> None:
    try:
        options: EmbedOptionsIn = validate_options(data)
    except InvalidOption as exc:
        assert exc.status == 422 and exc.message
        return
    _check_valid(options)


@settings(max_examples=200, deadline=None)
@given(st.integers(min_value=-(2**80), max_value=2**80))
def test_integers_round_trip_exactly_or_are_refused(value: int) -> None:
    for name, low, high in (("samples", 1, None), ("seed", 0, MAX_SEED)):
        try:
            parsed = getattr(parse_form_options({name: str(value)}), name)
        except InvalidOption:
            assert value < low or (high is not None and value > high) or len(str(abs(value))) > 30
        else:
            assert parsed == value


@pytest.mark.parametrize(
    ("fields", "words"),
    [
        ({"samples": "0"}, "samples"), ({"samples": "-1"}, "samples"), ({"samples": "abc"}, "samples"),
        ({"samples": "2.5"}, "samples"), ({"samples": ""}, "samples"), ({"samples": "1e3"}, "samples"),
        ({"samples": "٣"}, "samples"),  # a unicode digit int() would accept
        ({"seed": "-1"}, "seed"), ({"seed": str(2**53)}, "seed"), ({"seed": str(2**70)}, "seed"),
        ({"seed": "9" * 4000}, "seed"),  # no int() of a huge string (CPython's int-max-str-digits)
        ({"policy": "zoom"}, "policy"), ({"encoding": "hex"}, "encoding"),
        ({"normalize": "maybe"}, "normalize"), ({"return_variance": "yes"}, "return_variance"),
        ({"colour": "blue"}, "colour"),
    ],
)
def test_bad_form_values_name_their_field(fields: dict[str, str], words: str) -> None:
    with pytest.raises(InvalidOption, match=words):
        parse_form_options(fields)


@pytest.mark.parametrize(
    ("data", "words"),
    [
        ({"samples": True}, "samples"),  # strict: a boolean is not a count
        ({"samples": "4"}, "samples"), ({"samples": 4.0}, "samples"), ({"seed": 2**53}, "seed"),
        ({"seed": 2**70}, "seed"), ({"normalize": "true"}, "normalize"), ({"normalize": 1}, "normalize"),
        ({"policy": None, "model": 3}, "model"), ({"images": []}, "images"),
    ],
)
def test_json_options_are_strictly_typed(data: dict[str, object], words: str) -> None:
    with pytest.raises(InvalidOption, match=words):
        validate_options(data)


def test_max_seed_and_form_spellings_are_accepted() -> None:
    options: EmbedOptionsIn = parse_form_options({"seed": f" {MAX_SEED} ", "samples": "+3", "normalize": "TRUE",
                                  "view_normalize": "0", "policy": "multiscale", "encoding": "base64"})
    assert (options.seed, options.samples, options.normalize, options.view_normalize) == (MAX_SEED, 3, True, False)


def test_the_documented_form_booleans_are_what_the_parser_takes() -> None:
    # Schemathesis sent `normalize=1` as "violating the schema" when the form schema said boolean only.
    form = openapi_request_body()["content"]["multipart/form-data"]["schema"]["properties"]
    booleans = [name for name, field in EmbedOptionsIn.model_fields.items() if field.annotation is bool]
    assert booleans
    for name in booleans:
        assert form[name]["anyOf"] == [{"type": "boolean"}, {"type": "integer", "enum": [0, 1]}]
        for spelling, value in (("true", True), ("false", False), ("1", True), ("0", False)):
            assert getattr(parse_form_options({name: spelling}), name) is value
        with pytest.raises(InvalidOption, match=name):
            parse_form_options({name: "2"})


def test_a_field_of_several_types_gets_one_readable_message_and_unknown_options_read_alike() -> None:
    with pytest.raises(InvalidOption) as error:
        validate_options({"samples": 0})
    assert error.value.message == "samples: Input should be greater than or equal to 1 or 'auto'"  # no tags
    with pytest.raises(InvalidOption) as json_error:
        validate_options({"colour": "blue"})
    with pytest.raises(InvalidOption) as form_error:
        parse_form_options({"colour": "blue"})
    assert json_error.value.message == form_error.value.message == "colour: unknown option"
    for name in ("my-option", "2fast", "Samples "):  # not identifiers: still named, not taken for type tags
        with pytest.raises(InvalidOption, match=f"^{name}: unknown option"):
            validate_options({name: 1})


@pytest.mark.parametrize(("sent", "meant"), [("sample", "samples"), ("Seed", "seed"),
                                             ("return_varience", "return_variance"), ("Samples ", "samples")])
def test_a_misspelt_option_names_the_one_meant_in_both_encodings(sent: str, meant: str) -> None:
    for parse in (validate_options, parse_form_options):
        with pytest.raises(InvalidOption) as error:
            parse({sent: "1"})
        assert error.value.message == f"{sent}: unknown option; did you mean {meant!r}?"
