"""load_image: colour modes, EXIF orientation, and every kind of bad file raising UserError with its name."""

import io

import numpy as np
import pytest
from PIL import Image

from simvg.data.image_io import load_image, to_rgb
from simvg.errors import UserError


def _save(image: Image.Image, path, fmt: str = "PNG", **kw) -> str:
    image.save(path, fmt, **kw)
    return str(path)


def test_rgb_jpeg_roundtrip(tmp_path):
    path = _save(Image.new("RGB", (40, 30), (200, 10, 10)), tmp_path / "a.jpg", "JPEG", quality=95)
    image = load_image(path)
    assert image.mode == "RGB" and image.size == (40, 30)
    r, g, b = image.getpixel((20, 15))
    assert abs(r - 200) <= 3 and g <= 13 and b <= 13


def test_grayscale_and_palette_become_rgb(tmp_path):
    gray = load_image(_save(Image.new("L", (8, 6), 77), tmp_path / "g.png"))
    assert gray.mode == "RGB" and gray.getpixel((0, 0)) == (77, 77, 77)
    pal = Image.new("P", (8, 6), 1)
    pal.putpalette([0, 0, 0, 10, 20, 30] + [0] * 762)
    assert load_image(_save(pal, tmp_path / "p.png")).getpixel((3, 3)) == (10, 20, 30)


def test_alpha_is_composited_on_white(tmp_path):
    rgba = Image.new("RGBA", (4, 4), (0, 0, 0, 0))
    rgba.putpixel((1, 1), (100, 50, 0, 255))
    rgba.putpixel((2, 2), (0, 0, 0, 128))  # half-transparent black over white -> ~127 grey
    image = load_image(_save(rgba, tmp_path / "a.png"))
    assert image.getpixel((0, 0)) == (255, 255, 255)
    assert image.getpixel((1, 1)) == (100, 50, 0)
    assert all(abs(c - 127) <= 1 for c in image.getpixel((2, 2)))


def test_palette_with_transparent_index(tmp_path):
    pal = Image.new("P", (4, 4), 0)
    pal.putpalette([0, 0, 0, 9, 8, 7] + [0] * 762)
    pal.putpixel((1, 1), 1)
    pal.info["transparency"] = 0
    image = load_image(_save(pal, tmp_path / "t.png"))
    assert image.getpixel((0, 0)) == (255, 255, 255) and image.getpixel((1, 1)) == (9, 8, 7)


def test_cmyk_jpeg(tmp_path):
    cmyk = Image.new("CMYK", (8, 8), (0, 255, 255, 0))  # pure red in CMYK
    image = load_image(_save(cmyk, tmp_path / "c.jpg", "JPEG", quality=95))
    r, g, b = image.getpixel((4, 4))
    assert r > 240 and g < 15 and b < 15


def test_sixteen_bit_scaled_not_clipped(tmp_path):
    values = np.array([[0, 257, 32896, 65535]], dtype=np.uint16)  # -> 0, 1, 128, 255
    path = _save(Image.fromarray(values), tmp_path / "d.png")
    assert Image.open(path).mode == "I;16"
    image = load_image(path)
    assert [image.getpixel((x, 0))[0] for x in range(4)] == [0, 1, 128, 255]
    as_i = Image.fromarray(values.astype(np.int32))  # mode "I", as older Pillow opens 16-bit PNG
    assert [to_rgb(as_i).getpixel((x, 0))[1] for x in range(4)] == [0, 1, 128, 255]


def test_float_image():
    f = Image.fromarray(np.array([[0.0, 0.5, 1.0]], dtype=np.float32))
    assert [to_rgb(f).getpixel((x, 0))[0] for x in range(3)] == [0, 128, 255]


def test_exif_orientation_is_applied(tmp_path):
    base = Image.new("RGB", (30, 10), (0, 0, 255))
    base.paste((255, 0, 0), (0, 0, 5, 10))  # red stripe on the left of the stored pixels
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    path = _save(base, tmp_path / "o.jpg", "JPEG", quality=95, exif=exif.tobytes())
    image = load_image(path)
    assert image.size == (10, 30)
    assert image.getpixel((5, 2))[0] > 200  # the left stripe is now at the top
    assert load_image(path, exif=False).size == (30, 10)


def test_bytes_input():
    buf = io.BytesIO()
    Image.new("RGB", (5, 5), (1, 2, 3)).save(buf, "PNG")
    assert load_image(buf.getvalue()).getpixel((0, 0)) == (1, 2, 3)


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda p: None, "not found"),
        (lambda p: p.write_bytes(b""), "empty"),
        (lambda p: p.write_text("hello, I am text"), "not an image"),
        (lambda p: p.write_bytes(b"\xff\xd8\xff\xe0" + bytes(range(256)) * 4), "image"),
    ],
    ids=["missing", "zero-byte", "non-image", "corrupt-jpeg"],
)
def test_bad_files_raise_user_error_naming_file(tmp_path, make, message):
    path = tmp_path / "bad.jpg"
    make(path)
    with pytest.raises(UserError, match=message) as info:
        load_image(path)
    assert str(path) in str(info.value)


def test_truncated_image(tmp_path):
    rng = np.random.default_rng(0)
    full = tmp_path / "full.jpg"
    Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(full, "JPEG")
    cut = tmp_path / "cut.jpg"
    cut.write_bytes(full.read_bytes()[: full.stat().st_size // 2])
    with pytest.raises(UserError, match="truncated") as info:
        load_image(cut)
    assert "cut.jpg" in str(info.value)


def test_decompression_bomb(tmp_path):
    path = _save(Image.new("L", (200, 200)), tmp_path / "big.png")
    with pytest.raises(UserError, match="decompression bomb"):
        load_image(path, max_pixels=200 * 200 - 1)
    assert load_image(path, max_pixels=200 * 200).size == (200, 200)


def test_directory_is_not_an_image(tmp_path):
    with pytest.raises(UserError, match="not a file"):
        load_image(tmp_path)
