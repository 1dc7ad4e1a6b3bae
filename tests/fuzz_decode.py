"""Fuzz the image decoder: any bytes give a checked uint8 RGB tensor, InvalidImage or PayloadTooLarge.

    .venv/bin/python -m tests.fuzz_decode --seconds 300               # atheris (libFuzzer), seeded corpus
    .venv/bin/python -m tests.fuzz_decode --seconds 300 --hypothesis  # the fallback without atheris

Run from the repository root (`make fuzz`). Not collected by pytest (not a test_*.py file): it runs for
minutes; `tests/unit/test_decode.py` holds the short hypothesis property that `make test` runs.

atheris mutates a seed corpus (written to --corpus) of small valid images of every allowed format and
odd mode, and small members of each hostile family the prechecks know (`service.hostile`), guided by
coverage of the Python code it instruments (Pillow's plugins and our decoder; Pillow's C codecs are
exercised but not instrumented). Any other exception, a hang past -timeout or
memory past -rss_limit_mb is a finding: libFuzzer stops and writes the input as crash-*/timeout-*/oom-*.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from service.core.decode import SizeLimits

LIMITS: SizeLimits = {"max_pixels": 40_000_000, "max_side": 12_000}  # the service's defaults


def seed_images() -> dict[str, bytes]:
    """One small valid file per allowed format and awkward mode: where mutations start."""
    from PIL import Image

    from service import hostile

    rng = np.random.default_rng(0)
    rgb = Image.fromarray(rng.integers(0, 256, (24, 32, 3), dtype=np.uint8))
    out: dict[str, bytes] = {}

    def save(name: str, image: Image.Image, fmt: str, **params: object) -> None:
        buffer = io.BytesIO()
        image.save(buffer, fmt, **params)
        out[name] = buffer.getvalue()

    save("rgb.png", rgb, "PNG")
    save("rgba.png", rgb.convert("RGBA"), "PNG")
    save("la.png", rgb.convert("LA"), "PNG")
    save("palette.png", rgb.convert("P"), "PNG", transparency=0)
    save("grey16.png", Image.fromarray((np.arange(24 * 32).reshape(24, 32) * 80).astype(np.uint16)), "PNG")
    save("rgb.jpg", rgb, "JPEG", quality=80)
    save("progressive.jpg", rgb, "JPEG", quality=80, progressive=True)
    save("cmyk.jpg", rgb.convert("CMYK"), "JPEG")
    exif = Image.Exif()
    exif[0x0112] = 6
    save("exif.jpg", rgb, "JPEG", exif=exif)
    save("lossy.webp", rgb, "WEBP", quality=50)
    save("lossless.webp", rgb.convert("RGBA"), "WEBP", lossless=True)
    save("anim.gif", rgb.convert("P"), "GIF", save_all=True, append_images=[rgb.convert("P").rotate(90)])
    save("rgb.bmp", rgb, "BMP")
    save("rgb.tif", rgb, "TIFF", compression="tiff_lzw")
    save("f.tif", rgb.convert("F"), "TIFF")
    save("i16.tif", Image.fromarray((np.arange(24 * 32).reshape(24, 32) * 80).astype(np.uint16)), "TIFF")
    save("strips.tif", rgb, "TIFF", strip_size=32 * 3)
    save("icc.png", rgb, "PNG", icc_profile=hostile.padded_profile(64))
    # Small members of the hostile families (service.hostile): mutations explore around each amplifier.
    out["rle8.bmp"] = hostile.bmp_rle8(np.asarray(rgb.convert("L")) // 32 * 32)
    out["rle8-bomb.bmp"] = hostile.bmp_rle8_bomb(3_000, 40)
    out["profiles.png"] = hostile.png_many_profiles(3, 10_000)
    out["ztxt.png"] = hostile.png_many_compressed_texts(3, 10_000)
    out["anim.png"] = hostile.apng(12, (32, 24))
    out["comments.gif"] = hostile.gif_many_comments(300)
    out["strips-over.tif"] = hostile.tiff_many_strips(500)
    out["float-flat.tif"] = hostile.float_tiff(640, 480)
    save("rgb.avif", rgb, "AVIF", quality=60)
    save("exif.avif", rgb, "AVIF", quality=60, exif=exif)
    import pillow_heif  # the HEIC encoder (a dev dependency); its opener is not registered: pi-heif decodes

    heic = io.BytesIO()
    pillow_heif.from_pillow(rgb).save(heic, quality=60)
    out["rgb.heic"] = heic.getvalue()
    return out


def check_one(data: bytes) -> None:
    from service.core.decode import decode_image
    from service.core.errors import InvalidImage, PayloadTooLarge

    try:
        image = decode_image(data, **LIMITS)
    except (InvalidImage, PayloadTooLarge):
        return
    if image.dtype.is_floating_point or image.ndim != 3 or image.shape[0] != 3 or min(image.shape) < 1:
        raise AssertionError(f"decoder returned {image.dtype} {tuple(image.shape)}")


def run_atheris(seconds: int, corpus: Path, extra: list[str]) -> None:
    import atheris

    with atheris.instrument_imports(include=["PIL", "service"]):
        from PIL import Image

        from service.core import decode  # noqa: F401  (instrumented import)

        Image.init()  # imports every format plugin now, inside the instrumented block

    corpus.mkdir(parents=True, exist_ok=True)
    for name, data in seed_images().items():
        (corpus / name).write_bytes(data)
    argv = [sys.argv[0], str(corpus), f"-max_total_time={seconds}", "-timeout=10", "-rss_limit_mb=3072",
            "-max_len=65536", "-print_final_stats=1", f"-artifact_prefix={corpus.parent}/fuzz-finding-", *extra]
    atheris.Setup(argv, check_one)
    atheris.Fuzz()


def run_hypothesis(seconds: int) -> None:
    from hypothesis import HealthCheck, Phase, given, settings
    from hypothesis import strategies as st

    seeds = list(seed_images().values())
    count = 0

    @st.composite
    def mutated(draw: st.DrawFn) -> bytes:
        data = bytearray(draw(st.sampled_from(seeds)))
        for _ in range(draw(st.integers(1, 8))):
            at = draw(st.integers(0, len(data) - 1))
            data[at : at + 4] = draw(st.binary(min_size=0, max_size=8))
        return bytes(data[: draw(st.integers(1, len(data)))])

    started = time.monotonic()

    # Generate only: the stop signal (_Done) is not a finding to shrink or replay (a replay can land before
    # the time is up and hypothesis then reports a flaky failure).
    @settings(max_examples=10**9, deadline=None, database=None, suppress_health_check=list(HealthCheck),
              phases=[Phase.generate])
    @given(st.one_of(mutated(), st.binary(max_size=4096)))
    def fuzz(data: bytes) -> None:
        nonlocal count
        count += 1
        check_one(data)
        if time.monotonic() - started > seconds:
            raise _Done

    with contextlib.suppress(_Done):
        fuzz()
    print(f"hypothesis: {count} inputs in {time.monotonic() - started:.0f} s, no untyped error")


class _Done(Exception):
    pass


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=int, default=120)
    parser.add_argument("--corpus", type=Path, default=Path("/tmp/metta-fuzz-corpus"))
    parser.add_argument("--hypothesis", action="store_true", help="use hypothesis even if atheris is installed")
    args, extra = parser.parse_known_args()
    if not args.hypothesis:
        try:
            import atheris  # noqa: F401
        except ImportError:
            print("atheris is not installed: falling back to hypothesis", file=sys.stderr)
        else:
            run_atheris(args.seconds, args.corpus, extra)
            return
    run_hypothesis(args.seconds)


if __name__ == "__main__":
    main()
