"""Pre-training samples: a SynthRef scene drawn on the fly, its linked caption as token ids, MLM masks and the
per-object patch coverage that the alignment objective aims at.

Sample ``i`` of stream ``s`` depends only on (``data.seed``, s, i): training reads stream 0 at indices
``step * global_batch + rank * batch + j``, validation stream 1 at ``0 .. val_samples - 1``. A resumed or
re-sharded run therefore sees exactly the samples an uninterrupted one would, without any sampler state.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset, Sampler

from simvg.data.tokenizer import BOS_ID, EOS_ID, PAD_ID, UNK_ID, BEiT3Tokenizer
from simvg.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from simvg.errors import UserError
from simvg.pretrain.config import CaptionData
from simvg.synthref.captions import NO_OBJECT, coverage, describe
from simvg.synthref.scene import MAX_OBJECTS, draw_scene

TRAIN_STREAM, VAL_STREAM = 0, 1
IGNORE = -100  # label of a token that is not predicted (torch's cross_entropy ignore_index)


def normalise(image: np.ndarray) -> Tensor:
    """[S, S, 3] uint8 -> [3, S, S] float32 with the ImageNet mean/std that ``simvg train`` uses."""
    mean, std = np.asarray(IMAGENET_MEAN, np.float32), np.asarray(IMAGENET_STD, np.float32)
    return torch.from_numpy(((image.astype(np.float32) / 255.0 - mean) / std).transpose(2, 0, 1).copy())


class CaptionScenes(Dataset):
    """Map-style view of one stream of generated samples (``len`` is only a bound for samplers)."""

    def __init__(
        self, cfg: CaptionData, tokenizer: BEiT3Tokenizer, image_size: int, patch: int, stream: int,
        refer_first: bool = False,
    ) -> None:  # fmt: skip
        self.cfg, self.tokenizer, self.size, self.patch, self.stream = cfg, tokenizer, image_size, patch, stream
        self._pieces: dict[str, list[int]] = {}
        self.refer_first = refer_first  # the first phrase singles its object out (the object-token objective)
        self.mask_id = tokenizer.vocab_size - 1  # BEiT-3's <mask>, the last id

    def __len__(self) -> int:
        return 2**62

    def word_ids(self, words: tuple[str, ...] | list[str]) -> list[list[int]]:
        """Pieces of each word; cached, since captions draw on a few dozen words and ``fits`` asks per phrase."""
        for w in words:
            if w not in self._pieces:
                self._pieces[w] = self.tokenizer.piece_ids(w)
        return [self._pieces[w] for w in words]

    def __getitem__(self, index: int) -> dict[str, Any]:
        """One sample: ``image`` [3, S, S], ``ids`` / ``labels`` / ``links`` [L] long (``links`` = object of each
        token or -1), ``pad`` [L] bool, ``coverage`` [MAX_OBJECTS, N] float, ``referent`` long (the first
        phrase's object), ``caption`` str."""
        rng = np.random.default_rng([self.cfg.seed, self.stream, int(index)])
        image, objects = draw_scene(rng, self.size, self.cfg.max_objects, self.cfg.background)
        budget = self.cfg.max_tokens - 2  # <s> and </s>
        fits = lambda words: sum(map(len, self.word_ids(words))) <= budget  # noqa: E731
        caption = describe(objects, self.size, rng, fits=fits, refer_first=self.refer_first)
        ids, links = [BOS_ID], [NO_OBJECT]
        for pieces, link in zip(self.word_ids(caption.words), caption.links):
            ids += pieces
            links += [link] * len(pieces)
        if len(ids) > budget + 1:  # only the first phrase can overflow: describe() adds no phrase that does not fit
            raise UserError(
                f"data.max_tokens {self.cfg.max_tokens} cannot hold the caption {caption.text!r} ({len(ids) + 1} "
                "tokens with <s> and </s>); raise data.max_tokens"
            )
        ids, links = ids + [EOS_ID], links + [NO_OBJECT]
        labels = [IGNORE] * len(ids)
        for i, link in enumerate(links):
            if link != NO_OBJECT and rng.random() < self.cfg.mask_prob:
                labels[i], ids[i] = ids[i], self.mask_id
        length = self.cfg.max_tokens
        pad = length - len(ids)
        share = np.zeros((MAX_OBJECTS, (self.size // self.patch) ** 2), dtype=np.float32)
        share[: len(objects)] = coverage(objects, self.size, self.patch)
        return {
            "image": normalise(image),
            "ids": torch.tensor(ids + [PAD_ID] * pad),
            "pad": torch.tensor([False] * len(ids) + [True] * pad),
            "labels": torch.tensor(labels + [IGNORE] * pad),
            "links": torch.tensor(links + [NO_OBJECT] * pad),
            "coverage": torch.from_numpy(share),
            "referent": torch.tensor(caption.referent),
            "caption": caption.text,
        }


def collate(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack the tensors of a list of samples; captions stay a list."""
    batch = {k: torch.stack([s[k] for s in samples]) for k in samples[0] if k != "caption"}
    batch["caption"] = [s["caption"] for s in samples]
    return batch


class StepBatches(Sampler[list[int]]):
    """Index lists of the training stream for steps ``start .. stop - 1`` of this rank (``world`` ranks, ``batch``
    samples each): a pure function of the step, so resuming at step k needs nothing but k."""

    def __init__(self, start: int, stop: int, batch: int, rank: int = 0, world: int = 1) -> None:
        self.start, self.stop, self.batch, self.rank, self.world = start, stop, batch, rank, world

    def __len__(self) -> int:
        return max(0, self.stop - self.start)

    def __iter__(self) -> Iterator[list[int]]:
        for step in range(self.start, self.stop):
            first = (step * self.world + self.rank) * self.batch
            yield list(range(first, first + self.batch))


def check_tokenizer(tokenizer: BEiT3Tokenizer, rows: int, words: list[str]) -> None:
    """The tokenizer's ids must fit the encoder's text table, and the caption words must not fall apart into
    unknown pieces (a tokenizer trained on another vocabulary would teach the encoder nothing about them)."""
    if tokenizer.vocab_size > rows:
        raise UserError(
            f"{tokenizer.path}: {tokenizer.vocab_size} token ids but the encoder's text embedding has {rows} rows"
        )
    unknown = [w for w in words if UNK_ID in tokenizer.piece_ids(w)]
    if unknown:
        raise UserError(f"{tokenizer.path}: caption words unknown to this tokenizer: {', '.join(unknown)}")
