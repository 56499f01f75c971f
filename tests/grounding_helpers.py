"""Shared builders for the inference, CLI, server, browser and export tests: a tiny random model in every format.

The model is ``simvg_tiny_test`` (64 px, 2-layer 64-d encoder) with a sentencepiece tokenizer trained on a handful
of expressions; it is written through the real paths (``save_checkpoint``, ``export_folder``), so the tests load
exactly what users load.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import torch
from PIL import Image, ImageDraw

from simvg.artifact import export_folder
from simvg.config import Config, DataConfig, ModelSection, to_dict
from simvg.data.tokenizer import BEiT3Tokenizer, train_tokenizer
from simvg.models import create_model
from simvg.utils.checkpoint import save_checkpoint

CORPUS = [
    "the red circle on the left",
    "the blue square right of the green triangle",
    "a small yellow star at the top",
    "the second circle from the left",
    "all red shapes",
    "the large purple square below the circle",
    "nothing here is orange",
]
MAX_TOKENS = 20


def make_tokenizer(folder: Path) -> Path:
    """A small sentencepiece model in BEiT-3's id layout at ``folder/tokenizer.spm``."""
    return train_tokenizer(CORPUS * 4, folder / "tokenizer.spm", vocab_size=60)


def make_config(tokenizer: Path, num_queries: int = 1) -> dict:
    """The plain-dict training config of a tiny model matching ``tokenizer``."""
    vocab = BEiT3Tokenizer(tokenizer).vocab_size
    model = ModelSection(
        preset="simvg_tiny_test", overrides={"num_queries": num_queries, "encoder": {"vocab_size": vocab}}
    )
    return to_dict(Config(model=model, data=DataConfig(image_size=64, max_tokens=MAX_TOKENS)))


def make_checkpoint(folder: Path, num_queries: int = 1, seed: int = 0) -> Path:
    """A ``simvg train``-style checkpoint (random weights) at ``folder/ckpt.pth``, tokenizer beside it."""
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = make_tokenizer(folder)
    config = make_config(tokenizer, num_queries)
    torch.manual_seed(seed)
    model = create_model(config["model"]["preset"], **config["model"]["overrides"])
    save_checkpoint(folder / "ckpt.pth", {"model": model.state_dict(), "config": config, "epoch": 0})
    return folder / "ckpt.pth"


def make_model_folder(folder: Path, num_queries: int = 1, seed: int = 0) -> Path:
    """An exported model folder (model.safetensors + model.yaml + tokenizer.spm), the embedded default's format."""
    ckpt = make_checkpoint(folder / "train", num_queries, seed)
    out = folder / "model"
    export_folder(ckpt, out)
    return out


def scene(width: int = 96, height: int = 64) -> Image.Image:
    """A small RGB picture with two shapes."""
    image = Image.new("RGB", (width, height), (240, 240, 240))
    draw = ImageDraw.Draw(image)
    draw.ellipse((8, 8, 40, 40), fill=(220, 30, 30))
    draw.rectangle((50, 20, 80, 50), fill=(30, 30, 220))
    return image


@contextlib.contextmanager
def running_server(app) -> Iterator[str]:
    """Serve ``app`` with uvicorn on a free loopback port in a thread; yields the base URL."""
    import uvicorn

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.02)
    assert server.started, "uvicorn did not start"
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()
