"""A photo benchmark set made offline from the sample photos: 12 MP camera-like files with real fine detail.

    python -m bench.photo_set --out /tmp/photos --count 40                 # 12 MP JPEGs
    python -m bench.photo_set --out /tmp/photos --count 8 --formats jpeg,heic,avif,png,screenshot

An upscaled 500×375 thumbnail has nothing at full resolution for a reduced decode to lose, so every photo
gets detail added after the upscale: sharpened texture (unsharp mask), fine patterns (gratings of 2–4 px
period, a checkerboard), rendered text of several sizes and sensor-like noise (luminance and chroma,
signal-dependent). JPEGs are written as a camera does (quality 92, 4:2:0); every fourth is stored rotated
with an EXIF orientation tag that turns it upright, every fifth is converted to Display P3 and tagged with
a Display P3 profile. `heic`, `avif` and `png` write the same upright sRGB picture in those formats;
`screenshot` writes 3840×2160 PNG "screenshots" (the photo in a window among text and flat UI colours).
File names say what each is: `NNNN[-rot6][-p3].jpg`. `--plain` writes the sample photos only upscaled
(`python -m bench.photo_set --out /tmp/plain --count 500 --plain [--keep-aspect]`), the set the issue's
reduced-decode goal names: stretched to 4032 × 3024, or at each photo's own aspect; `--short-side 2048 --step
10` makes every tenth at that shorter side (on the reduced decode's margin boundary at 1/4).
"""

from __future__ import annotations

import argparse
import io
import math
import struct
from pathlib import Path

import numpy as np
from PIL import Image, ImageCms, ImageDraw, ImageFilter, ImageFont

from service.testing import photos

CAMERA = (4032, 3024)
SCREEN = (3840, 2160)
_WORDS = ("metta", "serve", "photo", "detail", "pixel", "sensor", "grain", "street", "window", "42", "2026", "f/1.8")


def upscaled(source: Image.Image, *, keep_aspect: bool = False, short_side: int | None = None) -> Image.Image:
    """The source upscaled, bicubic, nothing added: to 4032 × 3024 (landscape or portrait as it is); with
    `keep_aspect` to as many pixels at its own aspect (sides that are rarely a multiple of 8); with `short_side`
    at its own aspect to that shorter side (to put the views' source pixels on a reduced-decode margin)."""
    if keep_aspect or short_side:
        scale = (short_side / min(source.size) if short_side
                 else math.sqrt(CAMERA[0] * CAMERA[1] / (source.width * source.height)))
        size = (round(source.width * scale), round(source.height * scale))
    else:
        size = CAMERA if source.width >= source.height else CAMERA[::-1]
    return source.convert("RGB").resize(size, Image.Resampling.BICUBIC)


def detailed_photo(source: Image.Image, seed: int) -> Image.Image:
    """`upscaled`, with fine detail added at full resolution."""
    rng = np.random.default_rng(seed)
    picture = upscaled(source)
    size = picture.size
    picture = picture.filter(ImageFilter.UnsharpMask(radius=3, percent=160, threshold=0))
    draw = ImageDraw.Draw(picture)
    width, height = size
    for _ in range(12):  # rendered text, 14 to 90 px high, dark or light
        font = ImageFont.load_default(size=int(rng.integers(14, 90)))
        text = " ".join(rng.choice(_WORDS, size=int(rng.integers(2, 6))))
        xy = (int(rng.integers(0, width - 400)), int(rng.integers(0, height - 100)))
        shade = int(rng.choice([20, 235]))
        draw.text(xy, text, fill=(shade, shade, shade), font=font)
    pixels = np.asarray(picture, dtype=np.float32).copy()
    for _ in range(3):  # fine patterns: gratings of 2-4 px period and a 2 px checkerboard, blended in
        h, w = int(rng.integers(200, 600)), int(rng.integers(200, 600))
        top, left = int(rng.integers(0, height - h)), int(rng.integers(0, width - w))
        yy, xx = np.mgrid[0:h, 0:w]
        period = float(rng.uniform(2.0, 4.0))
        angle = float(rng.uniform(0, np.pi))
        grating = np.sin(2 * np.pi * (xx * np.cos(angle) + yy * np.sin(angle)) / period)
        checker = ((xx // 2 + yy // 2) % 2) * 2.0 - 1.0
        pattern = 50.0 * (grating if rng.random() < 0.7 else checker)
        pixels[top:top + h, left:left + w] += pattern[..., None]
    # Sensor-like noise: luminance noise that grows with the signal (shot) plus a floor (read), weaker chroma.
    signal = np.clip(pixels.mean(2, keepdims=True), 0, None)
    luminance = rng.standard_normal((height, width, 1), dtype=np.float32) * (2.0 + 0.25 * np.sqrt(signal))
    chroma = rng.standard_normal((height, width, 3), dtype=np.float32) * 1.5
    pixels += luminance + chroma
    return Image.fromarray(np.clip(np.rint(pixels), 0, 255).astype(np.uint8))


def display_p3_profile() -> bytes:
    """An ICC v2 matrix/TRC profile of Display P3 (P3 primaries, D65 white adapted to D50, the sRGB curve),
    written here so no profile file is needed."""
    return matrix_profile(b"Display P3 (metta bench)", ((0.515102, 0.241196, -0.001053),
                                                        (0.291965, 0.692245, 0.041885),
                                                        (0.157153, 0.066561, 0.784100)))


def srgb_profile() -> bytes:
    """The same kind of profile for sRGB itself (its primaries adapted to D50), as cameras and editors embed
    one: converting it to sRGB changes nothing beyond rounding."""
    return matrix_profile(b"sRGB (metta bench)", ((0.436066, 0.222488, 0.013916), (0.385147, 0.716873, 0.097076),
                                                  (0.143066, 0.060608, 0.714096)))


def matrix_profile(name: bytes, colorants: tuple[tuple[float, float, float], ...]) -> bytes:
    """An ICC v2 RGB matrix/TRC profile: the red, green and blue colorants (XYZ, D50) and the sRGB curve."""
    def s15(value: float) -> bytes:
        return struct.pack(">i", round(value * 65536))

    def xyz(x: float, y: float, z: float) -> bytes:
        return b"XYZ " + bytes(4) + s15(x) + s15(y) + s15(z)

    desc = b"desc" + bytes(4) + struct.pack(">I", len(name) + 1) + name + b"\0" + bytes(4 + 4 + 2 + 1 + 67)
    curve = b"para" + bytes(4) + struct.pack(">HH", 3, 0) + b"".join(
        s15(v) for v in (2.4, 1 / 1.055, 0.055 / 1.055, 1 / 12.92, 0.04045))
    red, green, blue = colorants
    tags = [(b"desc", desc), (b"wtpt", xyz(0.9642, 1.0, 0.8249)),
            (b"rXYZ", xyz(*red)), (b"gXYZ", xyz(*green)), (b"bXYZ", xyz(*blue)),
            (b"rTRC", curve), (b"gTRC", curve), (b"bTRC", curve), (b"cprt", b"text" + bytes(4) + b"none\0\0\0\0")]
    offset = 128 + 4 + 12 * len(tags)
    table, data = b"", b""
    for signature, body in tags:
        body += bytes(-len(body) % 4)
        table += signature + struct.pack(">II", offset + len(data), len(body))
        data += body
    total = offset + len(data)
    header = (struct.pack(">I", total) + bytes(4) + struct.pack(">I", 0x02100000) + b"mntrRGB XYZ " + bytes(12)
              + b"acsp" + bytes(4) + bytes(4) + bytes(8) + bytes(8) + bytes(4)
              + s15(0.9642) + s15(1.0) + s15(0.8249) + bytes(4) + bytes(16) + bytes(28))
    assert len(header) == 128
    return header + struct.pack(">I", len(tags)) + table + data


def to_display_p3(picture: Image.Image, profile: bytes) -> Image.Image:
    """sRGB pixels → the same colours in Display P3 (what a phone writes, tagged with `profile`)."""
    srgb = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB"))
    p3 = ImageCms.ImageCmsProfile(io.BytesIO(profile))
    converted = ImageCms.profileToProfile(picture, srgb, p3, outputMode="RGB",
                                          renderingIntent=ImageCms.Intent.RELATIVE_COLORIMETRIC)
    assert converted is not None
    return converted


def camera_jpeg(picture: Image.Image, *, rotate: bool, p3: bool) -> bytes:
    """The upright sRGB picture as a camera JPEG (q92, 4:2:0), optionally stored turned with EXIF orientation 6
    and/or in Display P3 with its profile."""
    extra: dict[str, object] = {}
    if p3:
        profile = display_p3_profile()
        picture = to_display_p3(picture, profile)
        extra["icc_profile"] = profile
    if rotate:
        exif = Image.Exif()
        exif[0x0112] = 6  # "rotate 90° clockwise to view": the stored pixels are the upright ones turned back
        picture = picture.transpose(Image.Transpose.ROTATE_90)
        extra["exif"] = exif.tobytes()
    out = io.BytesIO()
    picture.save(out, "JPEG", quality=92, subsampling="4:2:0", **extra)
    return out.getvalue()


def screenshot(picture: Image.Image, seed: int) -> Image.Image:
    """A 4K "screenshot": flat UI colours, lines of text, the photo in a window."""
    rng = np.random.default_rng(seed)
    screen = Image.new("RGB", SCREEN, (236, 239, 242))
    draw = ImageDraw.Draw(screen)
    draw.rectangle((0, 0, SCREEN[0], 64), fill=(40, 44, 52))
    font = ImageFont.load_default(size=22)
    for row in range(90, SCREEN[1] - 40, 34):
        draw.text((40, row), " ".join(rng.choice(_WORDS, size=8)), fill=(30, 30, 30), font=font)
    window = picture.resize((2400, 2400 * picture.height // picture.width), Image.Resampling.LANCZOS)
    window = window.crop((0, 0, 2400, min(window.height, 1800)))
    screen.paste(window, (1300, 200))
    return screen


def write_set(out: Path, count: int, formats: list[str], *, plain: bool = False, keep_aspect: bool = False,
              short_side: int | None = None, step: int = 1) -> list[Path]:
    """`plain`: the sample photos only upscaled (no detail, no rotation, sRGB): the set on which the real-photos
    issue states its reduced-decode goal; `keep_aspect`, `short_side`: see `upscaled`; `step`: every step-th
    sample photo (the file keeps its index in the sample folder)."""
    out.mkdir(parents=True, exist_ok=True)
    pictures = photos(count * step)
    written = []
    for index, data in list(enumerate(pictures.images))[::step]:
        source = Image.open(io.BytesIO(data))
        picture = (upscaled(source, keep_aspect=keep_aspect, short_side=short_side) if plain
                   else detailed_photo(source, seed=index))
        rotate, p3 = (False, False) if plain else (index % 4 == 1, index % 5 == 2)
        for fmt in formats:
            if fmt == "jpeg":
                path = out / f"{index:04d}{'-rot6' if rotate else ''}{'-p3' if p3 else ''}.jpg"
                path.write_bytes(camera_jpeg(picture, rotate=rotate, p3=p3))
            elif fmt == "heic":  # pillow-heif's encoder, its opener not registered (pi-heif decodes)
                import pillow_heif

                path = out / f"{index:04d}.heic"
                pillow_heif.from_pillow(picture).save(path, quality=80)
            elif fmt == "avif":
                path = out / f"{index:04d}.avif"
                picture.save(path, "AVIF", quality=80)
            elif fmt == "png":
                path = out / f"{index:04d}.png"
                picture.save(path, "PNG", compress_level=1)
            elif fmt == "screenshot":
                path = out / f"{index:04d}-screen.png"
                screenshot(picture, seed=index).save(path, "PNG", compress_level=6)
            else:
                raise SystemExit(f"unknown format {fmt!r}")
            written.append(path)
    return written


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--count", type=int, default=40, help="sample photos to start from (at most 500)")
    parser.add_argument("--formats", default="jpeg", help="comma-separated: jpeg, heic, avif, png, screenshot")
    parser.add_argument("--plain", action="store_true", help="only upscaled: no added detail, rotation or P3")
    parser.add_argument("--keep-aspect", action="store_true",
                        help="with --plain: 12 MP at each photo's own aspect instead of 4032 x 3024")
    parser.add_argument("--short-side", type=int, help="with --plain: this shorter side at each photo's own aspect")
    parser.add_argument("--step", type=int, default=1, help="every step-th sample photo (--count of them)")
    args = parser.parse_args(argv)
    if (args.keep_aspect or args.short_side) and not args.plain:
        parser.error("--keep-aspect and --short-side go with --plain")
    written = write_set(args.out, args.count, args.formats.split(","), plain=args.plain, keep_aspect=args.keep_aspect,
                        short_side=args.short_side, step=args.step)
    print(f"{len(written)} files in {args.out}")


if __name__ == "__main__":
    main()
