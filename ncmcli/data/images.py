"""Decoding one untrusted image file into a uint8 tensor of the model's channels and size."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ncmcli.errors import ImageError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"}

# A 64-megapixel cap keeps a decompression bomb from exhausting memory: PIL refuses larger.
MAX_IMAGE_PIXELS = 64_000_000


RESIZE_MODES = ("crop", "squash")
# Bumped when decoding changes the pixels it returns (folder caches key on it): 2 = JPEGs
# decoded at a reduced size in the DCT (PIL's draft mode) and resized with reducing_gap.
DECODER_VERSION = 2
REDUCING_GAP = 3.0  # PIL: box-reduce by an integer factor first when the resize shrinks 3x or more


def _draft(im, channels: int, size: int, resize: str) -> None:
    """Let a JPEG decode at 1/2, 1/4 or 1/8 scale in the DCT (libjpeg's scaled decoding), as
    far as it stays at least as large as the resize needs: most of a large photo's decode
    time is skipped. Other formats ignore it."""
    if getattr(im, "format", None) != "JPEG" or min(im.size) <= size:
        return
    if resize == "crop":  # the shorter side must stay >= size
        s = size / min(im.size)
        request = (max(size, round(im.width * s)), max(size, round(im.height * s)))
    else:
        request = (size, size)
    im.draft("L" if channels == 1 else "RGB", request)


def load_image(path: Path, channels: int, size: int, resize: str = "squash") -> tuple[torch.Tensor, bool]:
    """(C, size, size) uint8 from any PIL-readable file, and whether it was resized.
    ``resize="crop"`` keeps the aspect ratio (the shorter side to ``size``, then a centre
    crop); ``"squash"`` stretches the whole image to the square."""
    import warnings

    from PIL import Image, ImageOps

    # PIL warns above MAX_IMAGE_PIXELS (the warning is an error here) and refuses above twice it.
    Image.MAX_IMAGE_PIXELS = MAX_IMAGE_PIXELS
    if not Path(path).is_file():  # a FIFO or device would block the read forever
        raise ImageError(f"{path}: not a regular file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                if im.width * im.height > MAX_IMAGE_PIXELS:
                    raise ImageError(f"{path}: image of {im.width}x{im.height} pixels is too large")
                _draft(im, channels, size, resize)
                im.load()
                # Cameras store pixels as shot and say how to turn them: show them as people see them.
                im = ImageOps.exif_transpose(im)
                if im.mode in ("I;16", "I;16B", "I;16L", "I"):
                    arr = np.asarray(im, dtype=np.float64)  # 16-bit grayscale: scale to 8 bits
                    im = Image.fromarray((arr * (255.0 / max(arr.max(), 1))).astype(np.uint8))
                if im.mode in ("RGBA", "LA", "P", "PA") or im.info.get("transparency") is not None:
                    im = im.convert("RGBA")
                    bg = Image.new("RGBA", im.size, (0, 0, 0, 255))  # composite alpha on black
                    im = Image.alpha_composite(bg, im)
                im = im.convert("L" if channels == 1 else "RGB")
                resized = im.size != (size, size)
                if resized and resize == "crop":
                    scale = size / min(im.size)
                    w, h = max(size, round(im.width * scale)), max(size, round(im.height * scale))
                    im = im.resize((w, h), Image.BILINEAR, reducing_gap=REDUCING_GAP)
                    left, top = (w - size) // 2, (h - size) // 2
                    im = im.crop((left, top, left + size, top + size))
                elif resized:
                    im = im.resize((size, size), Image.BILINEAR, reducing_gap=REDUCING_GAP)
                arr = np.asarray(im, dtype=np.uint8)
    except ImageError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise ImageError(f"{path}: image is too large (decompression bomb guard)") from None
    except Exception as exc:
        raise ImageError(f"{path}: not a readable image ({type(exc).__name__})") from None
    t = torch.from_numpy(arr.copy())
    t = t.unsqueeze(0) if t.ndim == 2 else t.permute(2, 0, 1)
    return t.contiguous(), resized
