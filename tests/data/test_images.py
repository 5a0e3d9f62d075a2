"""Untrusted images: every odd file gives a clear error or a sensible conversion."""

from pathlib import Path

import numpy as np
import pytest
from conftest import assert_clean_error, save_untrained
from PIL import Image

from ncmcli.data.images import MAX_IMAGE_PIXELS, load_image
from ncmcli.errors import ImageError


@pytest.mark.parametrize(
    "mode,channels",
    [("RGBA", 3), ("P", 3), ("I;16", 1), ("I;16", 3), ("L", 3), ("RGB", 1), ("LA", 1), ("1", 1), ("CMYK", 3)],
)
def test_modes_convert_to_the_model_channels(tmp_path, mode, channels):
    path = tmp_path / f"img.{'tiff' if mode == 'CMYK' else 'png'}"
    if mode == "I;16":
        arr = (np.arange(20 * 30).reshape(20, 30) * 100).astype(np.uint16)
        Image.fromarray(arr).save(path)
    else:
        Image.new(mode, (30, 20)).save(path)
    t, resized = load_image(path, channels, 16)
    assert t.shape == (channels, 16, 16) and t.dtype.is_floating_point is False and resized


def test_16_bit_is_scaled_not_clipped(tmp_path):
    arr = np.full((8, 8), 60000, dtype=np.uint16)
    arr[0, 0] = 0
    Image.fromarray(arr).save(tmp_path / "a.png")
    t, _ = load_image(tmp_path / "a.png", 1, 8)
    assert int(t.max()) == 255 and int(t.min()) == 0


def test_alpha_is_composited_on_black(tmp_path):
    Image.new("RGBA", (8, 8), (255, 255, 255, 0)).save(tmp_path / "clear.png")
    t, resized = load_image(tmp_path / "clear.png", 3, 8)
    assert int(t.max()) == 0 and not resized


@pytest.mark.parametrize("content", [b"", b"hello, I am text", b"\x89PNG\r\n\x1a\n\x00\x00"])
def test_broken_files_are_image_errors(tmp_path, content):
    path = tmp_path / "x.png"
    path.write_bytes(content)
    with pytest.raises(ImageError, match="not a readable image"):
        load_image(path, 3, 32)


def test_truncated_png(tmp_path):
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(
        tmp_path / "a.png"
    )
    blob = (tmp_path / "a.png").read_bytes()
    (tmp_path / "t.png").write_bytes(blob[: len(blob) // 2])
    with pytest.raises(ImageError):
        load_image(tmp_path / "t.png", 3, 32)


def test_decompression_bomb_is_refused_without_decoding(tmp_path):
    # A 1-bit PNG of 100k x 100k pixels is tiny on disk but 10 GB decoded.
    side = 100_000
    assert side * side > MAX_IMAGE_PIXELS
    import struct
    import zlib  # build the PNG by hand so the test itself stays small

    def chunk(kind, data):
        return (
            struct.pack(">I", len(data))
            + kind
            + data
            + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
        )

    row = b"\x00" + b"\x00" * (side // 8)
    comp = zlib.compressobj(9)
    body = b"".join(comp.compress(row) for _ in range(50)) + comp.flush()  # only 50 rows: truncated
    png = (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0))
        + chunk(b"IDAT", body)
        + chunk(b"IEND", b"")
    )
    (tmp_path / "bomb.png").write_bytes(png)
    with pytest.raises(ImageError, match="too large"):
        load_image(tmp_path / "bomb.png", 3, 32)


def test_predict_on_a_folder_without_images(cli, tmp_path):

    ck = save_untrained(
        tmp_path / "ck.safetensors",
        classes=[str(i) for i in range(10)],
        mean=(0.5,),
        std=(0.25,),
        epoch=1,
        metrics={},
    )[0]
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("x")
    assert_clean_error(cli("predict", tmp_path / "empty", "--checkpoint", ck), 2, "holds no images")


def test_exif_orientation_is_applied(tmp_path):
    from PIL import Image

    from ncmcli.data.images import load_image

    upright = Image.new("L", (8, 12), 0)
    upright.paste(255, (0, 0, 8, 3))  # a white band at the top
    upright.save(tmp_path / "upright.png")
    stored = upright.transpose(Image.Transpose.ROTATE_90)  # as a camera held sideways stores it
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to view"
    stored.save(tmp_path / "rotated.jpg", exif=exif, quality=100)
    a, _ = load_image(tmp_path / "upright.png", 1, 12)
    b, _ = load_image(tmp_path / "rotated.jpg", 1, 12)
    assert (a.float() - b.float()).abs().mean() < 8
    plain = stored.copy()
    plain.save(tmp_path / "no-exif.jpg", quality=100)
    c, _ = load_image(tmp_path / "no-exif.jpg", 1, 12)
    assert (a.float() - c.float()).abs().mean() > 40  # the tag is what made the difference


def test_the_pixel_cap_is_the_documented_64_megapixels(tmp_path):
    from PIL import Image

    from ncmcli.data.images import MAX_IMAGE_PIXELS, load_image
    from ncmcli.errors import ImageError

    assert (
        MAX_IMAGE_PIXELS == 64_000_000
        and "64 megapixels" in (Path(__file__).parents[2] / "docs" / "cli.md").read_text()
    )
    Image.new("L", (8000, 5000)).save(tmp_path / "40mp.png")
    assert load_image(tmp_path / "40mp.png", 1, 8)[0].shape == (1, 8, 8)
    Image.new("L", (8200, 8000)).save(tmp_path / "65mp.png")
    with pytest.raises(ImageError, match="too large"):
        load_image(tmp_path / "65mp.png", 1, 8)


def test_crop_resize_keeps_the_aspect_ratio(tmp_path):
    from PIL import Image

    from ncmcli.data.images import load_image

    im = Image.new("L", (40, 20), 0)
    im.paste(255, (10, 0, 30, 20))  # a white square in the middle of a wide image
    im.save(tmp_path / "wide.png")
    crop, _ = load_image(tmp_path / "wide.png", 1, 10, "crop")
    squash, _ = load_image(tmp_path / "wide.png", 1, 10, "squash")
    assert crop.float().mean() > 240  # the centre crop is the white square
    assert 100 < squash.float().mean() < 160  # squashing keeps the black sides
