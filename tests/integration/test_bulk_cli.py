"""`metta embed PATH... --out OUT.parquet` in-process with the dummy model: dataset, bad files, resume, exit codes."""

from __future__ import annotations

import asyncio
import errno
import http.client
import io
import json
import os
import re
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

import service.bulk.local
from models import ModelOptions, create_model
from service.bulk.lock import output_lock
from service.cli import main
from service.core.decode import decode_image
from service.core.embedding import embed, embed_stream
from service.core.policies import MultiscalePolicy
from service.testing import REPO
from tests.integration.conftest import running_server

DUMMY = ["--model", "dummy", "--mode", "eager"]


def write_photos(folder: Path, count: int, start: int = 0) -> list[Path]:
    paths = []
    for i in range(start, start + count):
        rng = np.random.default_rng(i)
        pixels = rng.integers(0, 256, (40 + i % 13, 60 + i % 7, 3), dtype=np.uint8)
        path = folder / ("sub" if i % 3 == 0 else "") / f"photo{i:03d}.{'JPEG' if i % 2 else 'png'}"
        path.parent.mkdir(parents=True, exist_ok=True)
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, "JPEG" if i % 2 else "PNG")
        path.write_bytes(buffer.getvalue())
        paths.append(path)
    return paths



def unanswered_address() -> str:
    """HOST:PORT of a loopback port nothing listens on."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{probe.getsockname()[1]}"

def metta(*args: str) -> int:
    with pytest.raises(SystemExit) as exit_info:
        main(["embed", *args])
    code = exit_info.value.code
    return code if isinstance(code, int) else (0 if code is None else 2)


def test_a_folder_becomes_a_dataset_with_bad_files_listed_and_the_library_numbers(tmp_path, capsys) -> None:
    photos = write_photos(tmp_path / "photos", 12)
    (tmp_path / "photos" / "broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    out = tmp_path / "out.parquet"
    assert metta(str(tmp_path / "photos"), "--out", str(out), "--samples", "4", "--policy", "crop_flip",
                 "--seed", "7", "--dispersion", "--part-rows", "5", *DUMMY) == 0
    summary = capsys.readouterr().out.strip().splitlines()[-1]
    assert "12 embedded, 0 already present, 1 skipped as bad" in summary
    table = pq.read_table(out)
    assert table.num_rows == 12 and len(list(out.glob("part-*.parquet"))) == 3  # 5 + 5 + 2 rows
    assert table.column_names == ["path", "path_bytes", "sha256", "embedding", "dispersion"]
    bad = [json.loads(line) for line in (tmp_path / "out.parquet.errors.jsonl").read_text().splitlines()]
    assert bad == [{"path": str(tmp_path / "photos" / "broken.jpg"), "type": "invalid_image",
                    "message": bad[0]["message"]}] and "broken.jpg" in bad[0]["message"]
    # The same numbers as the library call on the same files.
    model = create_model("dummy", ModelOptions(mode="eager"))
    decoded = [decode_image(p.read_bytes(), max_pixels=10**8, max_side=10**5) for p in photos]
    expected = embed(model, decoded, samples=4, policy="crop_flip", seed=7, return_dispersion=True)
    by_path = dict(zip(table.column("path").to_pylist(), table.column("embedding").to_pylist(), strict=True))
    for path, vector in zip(photos, expected.embeddings, strict=True):
        np.testing.assert_allclose(by_path[str(path)], vector, rtol=1e-6, atol=1e-6)



def test_the_readmes_columns_are_the_datasets_each_optional_one_with_its_flag(tmp_path) -> None:
    """The README's `Columns:` sentence: the columns every dataset has, then `name` with `--flag` for each
    column only that flag adds (it once listed `variance` and `dispersion` as if always there)."""
    text = re.sub(r"\([^)]*\)", "", " ".join((REPO / "README.md").read_text().split()).split("Columns: ", 1)[1])
    always, _, optional = text.split(";", 1)[0].partition(", and ")
    every, flagged = re.findall(r"`(\w+)`", always), re.findall(r"`(\w+)` with `--([\w-]+)`", optional)
    assert every and flagged and re.sub(r"`\w+` with `--[\w-]+`|[, ]", "", optional) == ""
    write_photos(tmp_path / "photos", 2)
    assert metta(str(tmp_path / "photos"), "--out", str(tmp_path / "plain.parquet"), *DUMMY) == 0
    assert pq.read_table(tmp_path / "plain.parquet").column_names == every
    for column, flag in flagged:
        out = tmp_path / f"{column}.parquet"
        assert metta(str(tmp_path / "photos"), "--out", str(out), f"--{flag}", *DUMMY) == 0
        assert pq.read_table(out).column_names == [*every, column]

def test_a_second_run_skips_what_is_there_and_embeds_only_new_files(tmp_path, capsys) -> None:
    folder = tmp_path / "photos"
    write_photos(folder, 6)
    out = str(tmp_path / "out.parquet")
    assert metta(str(folder), "--out", out, *DUMMY) == 0
    assert metta(str(folder), "--out", out, *DUMMY) == 0
    assert "0 embedded, 6 already present, 0 skipped as bad" in capsys.readouterr().out
    write_photos(folder, 2, start=6)
    assert metta(str(folder), "--out", out, *DUMMY) == 0
    assert "2 embedded, 6 already present" in capsys.readouterr().out
    paths = pq.read_table(out).column("path").to_pylist()
    assert len(paths) == len(set(paths)) == 8


def test_other_options_on_an_existing_dataset_exit_2_and_overwrite_starts_over(tmp_path, capsys) -> None:
    write_photos(tmp_path / "photos", 3)
    out = str(tmp_path / "out.parquet")
    assert metta(str(tmp_path / "photos"), "--out", out, *DUMMY) == 0
    assert metta(str(tmp_path / "photos"), "--out", out, "--samples", "5", *DUMMY) == 2
    assert "samples: dataset 3, this run 5" in capsys.readouterr().err
    assert metta(str(tmp_path / "photos"), "--out", out, "--samples", "5", "--overwrite", *DUMMY) == 0
    assert pq.read_schema(next(Path(out).glob("part-*.parquet"))).metadata[b"metta.samples"] == b"5"


def test_exit_codes_for_nothing_found_nothing_embeddable_and_bad_usage(tmp_path, capsys) -> None:
    (tmp_path / "empty").mkdir()
    assert metta(str(tmp_path / "empty"), "--out", str(tmp_path / "a.parquet"), *DUMMY) == 2
    assert metta(str(tmp_path / "missing"), "--out", str(tmp_path / "a.parquet"), *DUMMY) == 2
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "x.png").write_bytes(b"nope")
    assert metta(str(tmp_path / "bad"), "--out", str(tmp_path / "b.parquet"), *DUMMY) == 1
    assert metta(str(tmp_path / "bad"), "--out", str(tmp_path / "c.npy"), "--server", "http://x", *DUMMY) == 2
    assert metta(str(tmp_path / "bad"), "--out", str(tmp_path / "d.parquet"), "--policy", "center",
                 "--variance", *DUMMY) == 2
    assert "--server need a dataset" in capsys.readouterr().err


def test_ctrl_c_keeps_the_finished_rows_and_exits_130(tmp_path, monkeypatch, capsys) -> None:
    write_photos(tmp_path / "photos", 8)
    real_stream = embed_stream

    def interrupted(*args, **kwargs):
        for count, item in enumerate(real_stream(*args, **kwargs)):
            if count == 3:
                raise KeyboardInterrupt
            yield item

    monkeypatch.setattr(service.bulk.local, "embed_stream", interrupted)
    out = tmp_path / "out.parquet"
    assert metta(str(tmp_path / "photos"), "--out", str(out), *DUMMY) == 130
    assert pq.read_table(out).num_rows == 3
    summary = capsys.readouterr().out  # says the run was cut short, and how to finish it
    assert summary.startswith("metta embed: interrupted (Ctrl-C) after 3 embedded"), summary
    assert summary.rstrip().endswith("; the same command again resumes"), summary
    monkeypatch.setattr(service.bulk.local, "embed_stream", real_stream)
    assert metta(str(tmp_path / "photos"), "--out", str(out), *DUMMY) == 0
    summary = capsys.readouterr().out
    assert "5 embedded, 3 already present" in summary and "interrupted" not in summary


def test_ctrl_c_of_a_server_run_says_so_too(tmp_path, monkeypatch, capsys) -> None:
    """asyncio.run turns Ctrl-C into the cancellation of the --server run's task, then a KeyboardInterrupt."""
    import signal

    import service.bulk.remote

    write_photos(tmp_path / "photos", 5)
    real_run = service.bulk.remote.run_remote

    async def interrupted(files, *args, **kwargs):
        await real_run(files[:2], *args, **kwargs)
        os.kill(os.getpid(), signal.SIGINT)  # as Ctrl-C: asyncio.run's handler cancels the main task
        await asyncio.sleep(30)

    monkeypatch.setattr(service.bulk.remote, "run_remote", interrupted)
    out = tmp_path / "out.parquet"
    with running_server() as (address, _, _):
        assert metta(str(tmp_path / "photos"), "--out", str(out), "--server", url_of(address)) == 130
    assert pq.read_table(out).num_rows == 2
    assert capsys.readouterr().out.startswith("metta embed: interrupted (Ctrl-C) after 2 embedded")


def test_npy_output_keeps_todays_behaviour(tmp_path, capsys) -> None:
    photos = write_photos(tmp_path, 2)
    out = tmp_path / "means.npy"
    assert metta(*map(str, photos), "--out", str(out), "--samples", "2", "--variance", *DUMMY) == 0
    assert np.load(out).shape == (2, 16) and np.load(tmp_path / "means.variance.npy").shape == (2, 16)
    assert "means →" in capsys.readouterr().out


@pytest.mark.parametrize("out", ["s.parquet", "s.npy"])
def test_a_bad_option_is_one_message_and_exit_2_before_any_file_is_read(tmp_path, capsys, out) -> None:
    write_photos(tmp_path / "photos", 3)
    target = str(tmp_path / out)
    dummy_distinct = next(s for s in range(1, 300) if _too_many_views(s, 64))  # the dummy model's 64 px input
    for samples, says in [("1000", "--samples: at most 128, got 1000"),  # the server's max_samples setting
                          ("0", "--samples: samples must be at least 1, got 0"),
                          (str(dummy_distinct), f"makes at most {dummy_distinct - 1} distinct views")]:
        assert metta(str(tmp_path / "photos"), "--out", target, "--samples", samples, "--policy", "multiscale",
                     *DUMMY) == 2
        err = capsys.readouterr().err
        assert err.count("metta embed:") == 1 and says in err, err
    assert not (tmp_path / f"{out}.errors.jsonl").exists() and not (tmp_path / out).exists()
    # Checked before the inputs are listed: a missing folder is not what it complains about.
    assert metta(str(tmp_path / "missing"), "--out", target, "--samples", "1000", *DUMMY) == 2
    assert "--samples: at most 128" in capsys.readouterr().err


def _too_many_views(samples: int, input_size: int) -> bool:
    try:
        MultiscalePolicy().sizes(samples, input_size)
    except ValueError:
        return True
    return False


def test_one_folder_by_any_spelling_is_embedded_once(tmp_path, monkeypatch, capsys) -> None:
    write_photos(tmp_path / "photos", 5)
    (tmp_path / "alias").symlink_to(tmp_path / "photos")
    monkeypatch.chdir(tmp_path)
    out = str(tmp_path / "out.parquet")
    for spelling in ["photos", str(tmp_path / "photos"), "./photos/", "alias", "alias/../photos"]:
        assert metta(spelling, "--out", out, *DUMMY) == 0
    summaries = [line for line in capsys.readouterr().out.splitlines() if line.startswith("metta embed:")]
    assert "5 embedded" in summaries[0] and all("0 embedded, 5 already present" in s for s in summaries[1:])
    paths = pq.read_table(out).column("path").to_pylist()
    assert len(paths) == len(set(paths)) == 5 and all(p.startswith(str(tmp_path / "photos")) for p in paths)


def test_a_changed_file_is_embedded_again_and_its_stale_row_replaced(tmp_path, capsys) -> None:
    photos = write_photos(tmp_path / "photos", 4)
    out = str(tmp_path / "out.parquet")
    assert metta(str(tmp_path / "photos"), "--out", out, *DUMMY) == 0
    before = dict(zip(*pq.read_table(out, columns=["path", "sha256"]).to_pydict().values(), strict=True))
    photos[1].write_bytes(photos[2].read_bytes())  # edited since
    assert metta(str(tmp_path / "photos"), "--out", out, *DUMMY) == 0
    assert "1 embedded (1 replacing the stale row of a changed file), 3 already present" in capsys.readouterr().out
    after = dict(zip(*pq.read_table(out, columns=["path", "sha256"]).to_pydict().values(), strict=True))
    assert after.keys() == before.keys() and len(pq.read_table(out)) == 4
    assert after[str(photos[1])] == after[str(photos[2])] != before[str(photos[1])]


@pytest.mark.timeout(60)
def test_a_hostile_folder_is_embedded_with_its_special_files_reported(tmp_path, capsys) -> None:
    folder = tmp_path / "photos"
    write_photos(folder, 3)
    odd = os.fsencode(str(folder)) + b"/caf\xe9\xff.png"  # not UTF-8
    Path(os.fsdecode(odd)).write_bytes((folder / "photo001.JPEG").read_bytes())
    os.mkfifo(folder / "pipe.jpg")
    (folder / "zero.jpg").symlink_to("/dev/zero")
    out = tmp_path / "out.parquet"
    assert metta(str(folder), "--out", str(out), *DUMMY) == 0
    assert "4 embedded, 0 already present, 2 skipped as bad" in capsys.readouterr().out
    assert odd in pq.read_table(out).column("path_bytes").to_pylist()
    bad = [json.loads(line) for line in (tmp_path / "out.parquet.errors.jsonl").read_text().splitlines()]
    assert sorted((Path(b["path"]).name, b["type"]) for b in bad) == [("pipe.jpg", "not_a_regular_file"),
                                                                       ("zero.jpg", "not_a_regular_file")]
    assert metta(str(folder), "--out", str(out), *DUMMY) == 0  # and it resumes: the odd name is recognised
    assert "0 embedded, 4 already present" in capsys.readouterr().out


def test_a_second_run_into_the_same_output_is_refused(tmp_path, capsys) -> None:
    write_photos(tmp_path / "photos", 2)
    out = tmp_path / "out.parquet"
    with output_lock(out):  # the first run, still writing
        assert metta(str(tmp_path / "photos"), "--out", str(out), *DUMMY) == 2
    assert f"{out} is being written by another metta embed run" in capsys.readouterr().err
    assert not out.exists()
    assert metta(str(tmp_path / "photos"), "--out", str(out), *DUMMY) == 0



def test_a_cluster_bucket_or_server_run_into_a_busy_output_is_refused_before_it_starts(tmp_path, capsys) -> None:
    """The output's lock is taken first: no cluster is joined, no bucket listed, no server asked (here none of
    them exists, so anything but the lock's refusal would be another error, or a wait)."""
    write_photos(tmp_path / "photos", 1)
    out = tmp_path / "out.parquet"
    nobody = f"http://{unanswered_address()}"
    runs = {"ray": [str(tmp_path / "photos"), "--ray", "127.0.0.1:9", *DUMMY],
            "bucket": ["s3://no-such-bucket/photos/", *DUMMY],
            "server": [str(tmp_path / "photos"), "--server", nobody]}
    with output_lock(out):  # the first run, still writing
        for name, args in runs.items():
            started = time.monotonic()
            assert metta(*args, "--out", str(out)) == 2, name
            assert time.monotonic() - started < 5, name
            assert f"{out} is being written by another metta embed run" in capsys.readouterr().err, name
    assert not out.exists()

def test_a_full_disk_ends_with_a_message_exit_1_and_counts_of_the_rows_written(tmp_path, monkeypatch,
                                                                                capsys) -> None:
    write_photos(tmp_path / "photos", 7)
    real_write = pq.write_table
    parts = []

    def fill_up(table, where, **kwargs):
        parts.append(table.num_rows)
        if len(parts) > 2:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real_write(table, where, **kwargs)

    monkeypatch.setattr(pq, "write_table", fill_up)
    out = tmp_path / "out.parquet"
    assert metta(str(tmp_path / "photos"), "--out", str(out), "--part-rows", "2", *DUMMY) == 1
    captured = capsys.readouterr()
    assert "No space left on device" in captured.err and "Traceback" not in captured.err
    assert pq.read_table(out).num_rows == 4 and "metta embed: 4 embedded" in captured.out


def test_a_server_that_does_not_answer_fails_within_seconds_naming_it(tmp_path, capsys) -> None:
    write_photos(tmp_path / "photos", 1)
    url = f"http://{unanswered_address()}"
    started = time.monotonic()
    assert metta(str(tmp_path / "photos"), "--out", str(tmp_path / "out.parquet"), "--server", url) == 1
    assert time.monotonic() - started < 10
    assert f"--server {url}: nothing answers there" in capsys.readouterr().err



def test_a_server_that_wants_a_key_names_the_flag_that_gives_it(tmp_path, capsys) -> None:
    write_photos(tmp_path / "photos", 1)
    (tmp_path / "wrong").write_text("not-the-key\n")
    with running_server(api_keys="the-key") as (address, _, _):
        assert metta(str(tmp_path / "photos"), "--out", str(tmp_path / "a.parquet"), "--server", url_of(address)) == 2
        assert capsys.readouterr().err.rstrip().endswith(
            "asks for an API key (401): give its key with --api-key-file FILE")
        assert metta(str(tmp_path / "photos"), "--out", str(tmp_path / "b.parquet"), "--server", url_of(address),
                     "--api-key-file", str(tmp_path / "wrong")) == 2
        assert capsys.readouterr().err.rstrip().endswith(
            "asks for an API key (401): the key given is not one it accepts")


def test_a_ray_address_where_nothing_answers_fails_within_seconds_naming_it(tmp_path, capsys) -> None:
    write_photos(tmp_path / "photos", 1)
    address = unanswered_address()
    started = time.monotonic()
    assert metta(str(tmp_path / "photos"), "--out", str(tmp_path / "out.parquet"), "--ray", address, *DUMMY) == 1
    assert time.monotonic() - started < 10
    assert f"--ray {address}: nothing answers there" in capsys.readouterr().err

def url_of(address: tuple[str, int]) -> str:
    return f"http://{address[0]}:{address[1]}"


def test_server_mode_checks_the_options_against_the_servers_limits_and_takes_its_defaults(tmp_path,
                                                                                          capsys) -> None:
    """One source for the limits: with --server, the server's max_samples and defaults, not this machine's
    settings (here max_samples 128, the multiscale policy, S = 3)."""
    write_photos(tmp_path / "photos", 2)
    photos, above, defaults = str(tmp_path / "photos"), tmp_path / "above.parquet", tmp_path / "defaults.parquet"
    with running_server(max_samples=256, default_samples=5, default_policy="crop_flip") as (address, _, _):
        assert metta(photos, "--out", str(above), "--server", url_of(address), "--samples", "200") == 0
        assert metta(photos, "--out", str(defaults), "--server", url_of(address)) == 0
    assert pq.read_table(above).num_rows == 2 and pq.read_table(above).schema.metadata[b"metta.samples"] == b"200"
    metadata = pq.read_table(defaults).schema.metadata
    assert (metadata[b"metta.policy"], metadata[b"metta.samples"]) == (b"crop_flip", b"5")
    capsys.readouterr()
    with running_server(max_samples=4, classify_samples=4) as (address, _, _):
        assert metta(photos, "--out", str(tmp_path / "small.parquet"), "--server", url_of(address),
                     "--samples", "8") == 2
    assert "metta embed: --samples: at most 4, got 8" in capsys.readouterr().err
    assert not (tmp_path / "small.parquet").exists()


@contextmanager
def flaky_front(upstream: tuple[str, int], failures: list[str]) -> Iterator[tuple[str, dict[str, int]]]:
    """A loopback HTTP server in front of `upstream` that fails the first POSTs, one per entry of `failures`
    ("503": a 503 without Retry-After, so the client backs off; "drop": the connection closed with no reply),
    and forwards every other request. Yields its URL and the counts of what it did."""
    plan, lock = list(failures), threading.Lock()
    counts = {"failed": 0, "forwarded": 0}

    class Front(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: object) -> None:
            pass

        def do_GET(self) -> None:
            self.forward(b"")

        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("content-length") or 0))
            with lock:
                failure = plan.pop(0) if plan else None
                counts["failed" if failure else "forwarded"] += 1
            if failure == "drop":
                self.close_connection = True
            elif failure == "503":
                self.reply(503, [("content-type", "application/json")], b'{"error": {"code": "overloaded"}}')
            else:
                self.forward(body)

        def forward(self, body: bytes) -> None:
            connection = http.client.HTTPConnection(*upstream, timeout=60)
            try:
                headers = {k: v for k, v in self.headers.items() if k.lower() not in ("host", "connection")}
                connection.request(self.command, self.path, body or None, headers)
                upstream_reply = connection.getresponse()
                self.reply(upstream_reply.status, upstream_reply.getheaders(), upstream_reply.read())
            finally:
                connection.close()

        def reply(self, status: int, headers: list[tuple[str, str]], payload: bytes) -> None:
            self.send_response(status)
            for name, value in headers:
                if name.lower() not in ("connection", "content-length", "transfer-encoding", "date", "server"):
                    self.send_header(name, value)
            self.send_header("content-length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

    front = ThreadingHTTPServer(("127.0.0.1", 0), Front)
    front.daemon_threads = True
    thread = threading.Thread(target=front.serve_forever, daemon=True)
    thread.start()
    try:
        yield url_of(("127.0.0.1", front.server_port)), counts
    finally:
        front.shutdown()
        front.server_close()
        thread.join(10)


def test_a_flaky_server_is_retried_with_backoff_and_every_photo_lands_once(tmp_path, capsys) -> None:
    photos = write_photos(tmp_path / "photos", 9)
    out = tmp_path / "out.parquet"
    with running_server() as (address, _, _), flaky_front(address, ["503", "drop", "503", "drop"]) as (url, counts):
        assert metta(str(tmp_path / "photos"), "--out", str(out), "--server", url, "--samples", "2",
                     "--images-per-request", "2", "--concurrency", "2") == 0
    assert counts["failed"] == 4 and counts["forwarded"] == 5  # 9 photos, 2 a request
    assert sorted(pq.read_table(out).column("path").to_pylist()) == sorted(str(p.resolve()) for p in photos)
    summary = capsys.readouterr().out.strip().splitlines()[-1]
    assert "9 embedded, 0 already present, 0 skipped as bad, 4 requests retried" in summary
