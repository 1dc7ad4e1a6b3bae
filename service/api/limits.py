"""Cheap bounds on a request body before it is parsed."""

from __future__ import annotations

import numpy as np

from service.core.errors import PayloadTooLarge


def json_value_count(body: bytes) -> int:
    """An upper bound on the values in a JSON document's widest reach, from its bytes alone: in any array
    or object every value after the first follows a comma. (Nesting without commas, `[[[[…`, is bounded
    by the parser's recursion limit instead: 400.) Commas inside strings count too, so it errs towards
    refusing; base64 images hold none."""
    # numpy counts a 5 MB body in a quarter of the time of bytes.count, which holds the GIL meanwhile
    return 1 + int(np.count_nonzero(np.frombuffer(body, dtype=np.uint8) == ord(",")))


def check_json_size(body: bytes, max_values: int) -> None:
    """413 before `json.loads` for bodies of very many tiny values: 21 M `{}` in 64 MB cost 1.7 GB of
    Python objects and held the interpreter for seconds; a count of bytes costs milliseconds."""
    count = json_value_count(body)
    if count > max_values:
        raise PayloadTooLarge(f"the JSON body has up to {count} values; at most {max_values} are accepted")
