"""A corpus of bad and unusual inputs, built here, through the CLI (one line, exit 2), the API and the server (4xx).

Bad: missing, empty, truncated and non-image files, a pixel bomb, empty / too long / untokenizable text, and
checkpoints that are corrupt or not ours. Unusual but valid: grayscale, palette, RGBA, CMYK, 16-bit and
EXIF-rotated images, non-Latin text: these must give a correct result.
"""

from __future__ import annotations

import io
import pickle
import shutil
import struct
import zlib

import numpy as np
import pytest
import torch
import yaml
from fastapi.testclient import TestClient
from grounding_helpers import scene
from PIL import Image
from safetensors.torch import save_file

from simvg.cli import main
from simvg.errors import UserError
from simvg.inference.grounder import Grounder
from simvg.serve.app import ServeLimits, create_app


def pixel_bomb() -> bytes:
    """A valid PNG whose header claims 50000 x 50000 pixels (2.5 gigapixels); decoding it would exhaust memory."""
    buffer = io.BytesIO()
    Image.new("L", (1, 1)).save(buffer, format="PNG")
    data = bytearray(buffer.getvalue())
    data[16:24] = struct.pack(">II", 50_000, 50_000)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    return bytes(data)


def encoded(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def exif_rotated() -> bytes:
    """A 96x64 JPEG whose EXIF orientation 6 says: display rotated 90 degrees clockwise, i.e. as 64x96."""
    exif = Image.Exif()
    exif[0x0112] = 6
    return encoded(scene(96, 64), "JPEG", exif=exif.tobytes())


BAD_IMAGES = {  # name -> (bytes or None for a missing file, message)
    "missing.png": (None, "image not found"),
    "empty.png": (b"", "empty image"),
    "truncated.png": (encoded(scene(), "PNG")[:300], "unreadable image"),
    "notes.jpg": (b"these are my holiday notes, not a picture\n", "not an image file"),
    "bomb.png": (pixel_bomb(), "decompression bomb"),
}
UNUSUAL_IMAGES = {  # name -> (bytes, expected (width, height) after EXIF rotation)
    "gray.png": (encoded(scene().convert("L"), "PNG"), (96, 64)),
    "palette.gif": (encoded(scene().convert("P"), "GIF"), (96, 64)),
    "rgba.png": (encoded(scene().convert("RGBA"), "PNG"), (96, 64)),
    "cmyk.jpg": (encoded(scene().convert("CMYK"), "JPEG"), (96, 64)),
    "deep.png": (encoded(Image.fromarray(np.full((64, 96), 40000, dtype=np.uint16)), "PNG"), (96, 64)),
    "rotated.jpg": (exif_rotated(), (64, 96)),
}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    for name, (data, _) in {**BAD_IMAGES, **UNUSUAL_IMAGES}.items():
        if data is not None:
            (root / name).write_bytes(data)
    (root / "good.png").write_bytes(encoded(scene(), "PNG"))
    return root


def assert_one_line_error(capsys, *needles: str) -> None:
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert err.startswith("simvg ground: error: ")
    for needle in needles:
        assert needle in err, err


@pytest.mark.parametrize("name", sorted(BAD_IMAGES))
def test_bad_image_cli(folder, corpus, capsys, name):
    assert main(["ground", str(corpus / name), "the red circle", "--checkpoint", str(folder)]) == 2
    assert_one_line_error(capsys, name, BAD_IMAGES[name][1])


@pytest.mark.parametrize(
    ("text", "message"),
    [("", "text is empty"), ("   ", "text is empty"), ("?!", "empty after cleaning")],
)
def test_bad_text_cli(folder, corpus, capsys, text, message):
    assert main(["ground", str(corpus / "good.png"), text, "--checkpoint", str(folder)]) == 2
    assert_one_line_error(capsys, message)


@pytest.mark.parametrize("name", sorted(UNUSUAL_IMAGES))
def test_unusual_images_give_correct_results(grounder, corpus, name):
    data, size = UNUSUAL_IMAGES[name]
    result = grounder.ground(corpus / name, "the red circle")
    assert result.image_size == size and len(result.boxes) == 1
    x1, y1, x2, y2 = result.boxes[0]
    assert 0 <= x1 <= x2 <= size[0] and 0 <= y1 <= y2 <= size[1]
    assert grounder.ground(data, "the red circle").boxes == result.boxes


def test_exif_rotation_is_applied_before_the_model(grounder, corpus):
    rotated = grounder.ground(corpus / "rotated.jpg", "the red circle")
    upright = grounder.ground(grounder.open_image(corpus / "rotated.jpg"), "the red circle")
    assert rotated.boxes == upright.boxes and rotated.image_size == (64, 96)


def test_non_latin_and_long_text_are_answered(grounder, corpus):
    for text in ("赤い丸", "красный круг", "الدائرة الحمراء", "🙂 red"):
        result = grounder.ground(corpus / "good.png", text)
        assert len(result.boxes) == 1 and result.warnings
    assert grounder.ground(corpus / "good.png", "red circle " * 50).truncated


def _checkpoints(folder, root):
    """name -> (path to pass as --checkpoint, message expected in the error)."""
    real = (folder.parent / "train" / "ckpt.pth").read_bytes()
    cases = {}

    def file(name: str, data: bytes, message: str):
        (root / name).write_bytes(data)
        cases[name] = (root / name, message)

    def model_folder(name: str, message: str, edit):
        target = root / name
        shutil.copytree(folder, target)
        edit(target)
        cases[name] = (target, message)

    file("garbage.pth", bytes(range(256)) * 4, "not a readable checkpoint")
    file("truncated.pth", real[: len(real) // 2], "not a readable checkpoint")
    buffer = io.BytesIO()
    torch.save({"weights": torch.zeros(2)}, buffer)
    file("foreign.pth", buffer.getvalue(), "top-level keys: weights")
    buffer = io.BytesIO()
    torch.save(torch.zeros(3), buffer)
    file("tensor.pth", buffer.getvalue(), "not a checkpoint")
    file("pickle.pth", pickle.dumps({"model": ServeLimits()}), "not a readable checkpoint")
    cases["nowhere.pth"] = (root / "nowhere.pth", "checkpoint not found")
    model_folder("no_spec", "not a model folder (no model.yaml)", lambda d: (d / "model.yaml").unlink())
    model_folder("bad_yaml", "not readable YAML", lambda d: (d / "model.yaml").write_text("format: [unclosed"))
    model_folder("not_spec", "not a simvg model spec", lambda d: (d / "model.yaml").write_text("- a\n- b\n"))
    model_folder("bad_field", "model.yaml.architecture.embed_dim: expected int",
                 lambda d: (d / "model.yaml").write_text((d / "model.yaml").read_text().replace(
                     "  embed_dim: 32", "  embed_dim: wide")))  # fmt: skip
    model_folder("no_weights", "neither a model folder", lambda d: (d / "model.safetensors").unlink())
    model_folder("bad_weights", "unreadable weights", lambda d: (d / "model.safetensors").write_bytes(b"\x10" * 64))
    model_folder("foreign_weights", "not a simvg model",
                 lambda d: save_file({"w": torch.zeros(2)}, str(d / "model.safetensors")))  # fmt: skip
    model_folder("no_tokenizer", "tokenizer not found", lambda d: (d / "tokenizer.spm").unlink())
    model_folder("bad_tokenizer", "not a readable sentencepiece model",
                 lambda d: (d / "tokenizer.spm").write_bytes(b"nonsense"))  # fmt: skip

    def shallower(d):
        spec = yaml.safe_load((d / "model.yaml").read_text())
        spec["architecture"]["encoder"]["depth"] = 1
        (d / "model.yaml").write_text(yaml.safe_dump(spec))

    model_folder("mismatch", "unexpected keys", shallower)
    return cases


def test_bad_checkpoints_cli(folder, corpus, tmp_path, capsys):
    cases = _checkpoints(folder, tmp_path)
    for name, (path, message) in cases.items():
        assert main(["ground", str(corpus / "good.png"), "a", "--checkpoint", str(path)]) == 2, name
        assert_one_line_error(capsys, name, message)


def test_server_answers_4xx_to_the_whole_corpus_and_keeps_serving(grounder, corpus):
    app = create_app(grounder, ServeLimits(max_upload_bytes=2_000_000))
    with TestClient(app) as client:

        def post(data: bytes, text: str = "the red circle"):
            return client.post("/api/ground", files={"image": ("x", data)}, data={"text": text})

        for name, (data, message) in BAD_IMAGES.items():
            if data is not None:
                response = post(data)
                error = response.json()["error"]
                assert response.status_code == 400 and message in error and error.startswith("uploaded image:"), name
        for text in ("", "?!", "a" * 1001):
            assert post(encoded(scene(), "PNG"), text).status_code == 400
        # text that is not UTF-8 at all still gets an answer
        raw = client.post("/api/ground", files={"image": ("x", encoded(scene(), "PNG")), "text": (None, b"\xff\xfe")})
        assert raw.status_code in (200, 400) and raw.json()
        for name, (data, size) in UNUSUAL_IMAGES.items():
            body = post(data).json()
            assert body["image_size"] == {"width": size[0], "height": size[1]}, name
        assert client.get("/healthz").json()["status"] == "ok"


def test_unusable_device_and_backend_are_user_errors(folder, corpus, capsys):
    assert main(["ground", str(corpus / "good.png"), "a", "--checkpoint", str(folder), "--device", "tpu:9"]) == 2
    assert_one_line_error(capsys, "unknown device")
    if not torch.cuda.is_available():
        assert main(["ground", str(corpus / "good.png"), "a", "--checkpoint", str(folder), "--device", "cuda"]) == 2
        assert_one_line_error(capsys, "no CUDA GPU")
    with pytest.raises(UserError, match="backend must be"):
        Grounder.from_checkpoint(folder, backend="tensorrt")
