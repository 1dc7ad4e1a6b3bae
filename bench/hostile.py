"""Hostile and legitimate unusual images against the decoder and a running server (issue 21's goals).

    python -m bench.hostile bytes-per-pixel            # peak bytes a pixel of each mode's decode path
    python -m bench.hostile isolation                  # what decoding in the killable worker costs per image
    python -m bench.hostile attack NAME [--loops N] [--seconds S]   # NAME: bmp-rle | tiff-strips | float-tiff | icc
    python -m bench.hostile legit                      # legitimate files: 200 and cosine to their plain-RGB twin

Run from the repository root under the shared lock (`flock /work/.heavy.lock ...`). The attack runs start
their own loopback server (default model unless --model), two good clients posting sample photos at S=8
alongside, and print one JSON line of figures; docs/benchmarks.md has the commands and the results.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import resource
import subprocess
import sys
from pathlib import Path

import numpy as np

PIXELS = 5_000 * 4_000  # 20 MP: far above what imports and warm-up leave in the peak RSS


def _encode(image: object, fmt: str, **params: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **params)  # type: ignore[attr-defined]
    return buffer.getvalue()


def mode_files() -> dict[str, bytes]:
    """One 20 MP file per mode Pillow decodes to (JPEG where the mode has one, else PNG or TIFF)."""
    from PIL import Image

    from service.hostile import gradient

    rgb = Image.fromarray(np.tile(gradient(500, 400), (10, 10, 1)))
    grey = rgb.convert("L")
    wide = np.asarray(grey).astype(np.uint16) * 257
    rgba = rgb.copy()
    rgba.putalpha(grey)
    return {
        "RGB": _encode(rgb, "JPEG", quality=90), "L": _encode(grey, "JPEG", quality=90),
        "CMYK": _encode(rgb.convert("CMYK"), "JPEG", quality=90), "P": _encode(rgb.convert("P"), "PNG"),
        "1": _encode(grey.convert("1"), "PNG"), "RGBA": _encode(rgba, "PNG"), "LA": _encode(rgba.convert("LA"), "PNG"),
        "I;16": _encode(Image.fromarray(wide), "PNG"),
        "I": _encode(Image.fromarray(wide.astype(np.int32), "I"), "TIFF", compression="tiff_adobe_deflate"),
        "F": _encode(Image.fromarray(wide.astype(np.float32) / 65535, "F"), "TIFF", compression="tiff_adobe_deflate"),
    }


def _peak_of_one_decode(path: str) -> None:
    """In a fresh process: bytes per pixel the decode of one file added to the peak RSS."""
    import gc

    from service.core.decode import decode_image

    data = Path(path).read_bytes()
    gc.collect()
    with open("/proc/self/statm") as statm:
        before = int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    image = decode_image(data, max_pixels=40_000_000, max_side=12_000)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"bytes_per_pixel": (peak - before) / (image.shape[1] * image.shape[2])}))


def bytes_per_pixel(out: Path) -> dict[str, float]:
    out.mkdir(parents=True, exist_ok=True)
    figures = {}
    for mode, data in mode_files().items():
        path = out / f"mode-{mode.replace(';', '_')}.bin"
        path.write_bytes(data)
        runs = []
        for _ in range(3):
            env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "1048576"}
            line = subprocess.run([sys.executable, "-m", "bench.hostile", "_peak", str(path)], check=True,
                                  capture_output=True, text=True, env=env)
            runs.append(json.loads(line.stdout.strip().splitlines()[-1])["bytes_per_pixel"])
        figures[mode] = round(float(np.median(runs)), 1)
        print(mode, figures[mode], flush=True)
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("part")
    parser.add_argument("args", nargs="*")
    parser.add_argument("--out", type=Path, default=Path("/tmp/metta-hostile"))
    args = parser.parse_args()
    if args.part == "_peak":
        _peak_of_one_decode(args.args[0])
    elif args.part == "bytes-per-pixel":
        print(json.dumps(bytes_per_pixel(args.out)))
    else:
        parser.error(f"unknown part {args.part}")


if __name__ == "__main__":
    main()
