"""Every error is stated once (service/core/errors.py) and everything that shows errors agrees with it: the
README's error table, the OpenAPI document's error list, the metrics' reasons, and the envelope, which
only `error_body` writes."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import service
from service.api.app import create_app
from service.core import errors
from service.core.errors import ERRORS, REJECT_REASONS, ServiceError, error_body
from service.settings import Settings

REPO = Path(__file__).resolve().parents[2]


def subclasses(cls: type[ServiceError]) -> set[type[ServiceError]]:
    found = set(cls.__subclasses__())
    for sub in list(found):
        found |= subclasses(sub)
    return found


def all_service_errors() -> set[type[ServiceError]]:
    """Every ServiceError subclass anywhere in the service, once all its modules are imported."""
    import importlib

    for path in sorted((REPO / "service").rglob("*.py")):
        name = ".".join(path.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__")
        if name not in ("service.__main__",):
            importlib.import_module(name)
    return subclasses(ServiceError)


def test_every_error_class_lives_in_core_errors_and_is_in_the_table() -> None:
    """A subclass elsewhere (the engine's WorkerDied) may only name a cause of one of the rows: same status, type
    and reason; a new kind of error is a new row, in service/core/errors.py."""
    for cls in all_service_errors():
        if cls.__module__ != errors.__name__:
            row = next(row for row in ERRORS if issubclass(cls, row))
            assert (cls.status, cls.type, cls.reason) == (row.status, row.type, row.reason), cls
    in_module = {cls for cls in vars(errors).values()
                 if isinstance(cls, type) and issubclass(cls, ServiceError) and cls is not ServiceError}
    assert in_module == set(ERRORS)


def readme_error_table() -> set[tuple[int, str, str | None]]:
    text = (REPO / "README.md").read_text()
    start = text.index("| status | `type` | when | counted as |")
    rows = set()
    for line in text[start:].splitlines()[2:]:
        if not line.startswith("|"):
            break
        cells = [cell.strip() for cell in line.strip("|").split("|")]
        reason = None if cells[3] == "—" else cells[3].strip("`")
        rows.add((int(cells[0]), cells[1].strip("`"), reason))
    return rows


def test_the_readme_error_table_is_the_error_classes() -> None:
    assert readme_error_table() == {(cls.status, cls.type, cls.reason) for cls in ERRORS}


def test_every_status_and_type_is_in_the_openapi_error_list() -> None:
    document = create_app(Settings(model="dummy")).openapi()
    statuses = {str(cls.status) for cls in ERRORS}
    assert {"404", "405", "431"} <= statuses
    for path in ("/v1/embeddings", "/v1/classify", "/v1/models"):
        operation = next(iter(document["paths"][path].values()))
        responses = operation["responses"]
        assert statuses <= set(responses), (path, statuses - set(responses))
        for cls in ERRORS:
            assert f"`{cls.type}`" in responses[str(cls.status)]["description"], (path, cls)


def test_the_metrics_reasons_come_from_the_classes() -> None:
    assert set(REJECT_REASONS) == {cls.reason for cls in ERRORS if cls.reason is not None} | {"client_gone",
                                                                                               "write_timeout"}
    for cls in ERRORS:  # 4xx refusals are counted; 5xx other than a missed deadline are failures, not refusals
        if 400 <= cls.status < 500 and cls.status not in (404, 405):
            assert cls.reason is not None, cls


def test_the_envelope_is_written_in_one_place() -> None:
    assert json.loads(error_body("not_found", "x" * 10_000)) == {
        "error": {"type": "not_found", "message": "x" * 485 + "… (truncated)"}}
    writers = []
    for path in sorted(Path(service.__file__).parent.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Dict) and any(
                    isinstance(key, ast.Constant) and key.value == "error" for key in node.keys):
                writers.append(f"{path.relative_to(REPO)}:{node.lineno}")
    assert len(writers) == 1 and writers[0].startswith("service/core/errors.py:"), writers
