"""BEiT-3 text tokenization on ``sentencepiece`` directly, and training of compatible models.

BEiT-3 (microsoft/unilm) and SimVG load ``beit3.spm`` through ``transformers.XLMRobertaTokenizer``, whose ids follow
fairseq's dictionary: ``<s>`` = 0, ``<pad>`` = 1, ``</s>`` = 2, ``<unk>`` = 3, and every other piece = its
sentencepiece id + 1 (sentencepiece's own ``<unk>``, id 0, maps to 3). We reproduce that mapping without
transformers, whose 5.x releases no longer load a bare ``.spm`` file correctly (docs/design.md E2).

A sequence is built as in SimVG's ``LoadFromRawSource``: clean the expression (lower-case; delete ``.,'!?"()*#:;``;
``-`` and ``/`` become spaces), encode, truncate to ``max_len - 2`` pieces, wrap in ``<s> ... </s>`` and right-pad
with ``<pad>`` to ``max_len``. The padding mask is True at pads.

Models trained here (``train_tokenizer``, ``simvg tokenizer train``) reserve sentencepiece ids 0, 1, 2 for
``<unk>``, ``<s>``, ``</s>`` exactly as XLM-R's model does, so the +1 offset lands every real piece at id >= 4.
"""

from __future__ import annotations

import argparse
import io
import re
from collections.abc import Iterable
from pathlib import Path

import sentencepiece as spm
import torch
from torch import Tensor

from simvg.errors import UserError

BOS_ID, PAD_ID, EOS_ID, UNK_ID = 0, 1, 2, 3
# sentencepiece ids of the reserved pieces in an XLM-R-layout model; id 3 is the first real piece
_SPM_UNK, _SPM_BOS, _SPM_EOS = 0, 1, 2

_DELETE = re.compile(r"[.,'!?\"()*#:;]")
_TO_SPACE = re.compile(r"[-/]")


def clean_expression(text: str) -> str:
    """SimVG's expression cleaning: lower-case, drop ``.,'!?"()*#:;``, ``-`` and ``/`` -> space, squeeze spaces."""
    text = _TO_SPACE.sub(" ", _DELETE.sub("", text.lower()))
    return " ".join(text.split())


class BEiT3Tokenizer:
    """Text -> BEiT-3 ids of fixed length ``max_len`` (SimVG grounding uses 20).

    Args:
        spm_path: a sentencepiece model whose ids 0, 1, 2 are ``<unk>``, ``<s>``, ``</s>`` (``beit3.spm`` or one
            written by ``train_tokenizer``).
        max_len: sequence length including ``<s>`` and ``</s>``; at least 3.
    """

    def __init__(self, spm_path: str | Path, max_len: int = 20) -> None:
        if max_len < 3:
            raise UserError(f"tokenizer max_len must be at least 3 (<s>, one piece, </s>), got {max_len}")
        self.path = Path(spm_path)
        self.max_len = max_len
        self.sp = _load_model(self.path)

    @property
    def vocab_size(self) -> int:
        """Ids including ``<mask>``: pieces + 2 (64002 for ``beit3.spm``); the text embedding needs as many rows."""
        return self.sp.get_piece_size() + 2

    def __call__(self, texts: list[str]) -> tuple[Tensor, Tensor]:
        """Encode a batch: returns ids [B, L] long and pad_mask [B, L] bool (True = pad), L = ``max_len``."""
        if isinstance(texts, str):
            raise TypeError("BEiT3Tokenizer expects a list of strings; use encode_one for a single string")
        rows = [self._ids(t) for t in texts]
        ids = torch.full((len(rows), self.max_len), PAD_ID, dtype=torch.long)
        for i, row in enumerate(rows):
            ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
        return ids, ids.eq(PAD_ID)

    def encode_one(self, text: str) -> tuple[Tensor, Tensor]:
        """Encode one expression: ids [L] long and pad_mask [L] bool."""
        ids, mask = self([text])
        return ids[0], mask[0]

    def tokenize(self, text: str) -> list[str]:
        """Sentencepiece pieces of the cleaned text, untruncated (an unknown span is returned as its own text)."""
        return [piece for piece, _, _ in self._pieces(text)]

    def offsets(self, text: str) -> list[tuple[int, int]]:
        """Character span ``[start, end)`` in ``clean_expression(text)`` of each piece from ``tokenize``."""
        return [span for _, _, span in self._pieces(text)]

    def piece_ids(self, text: str) -> list[int]:
        """BEiT-3 ids of the pieces of ``tokenize`` (no ``<s>``/``</s>``, no truncation)."""
        return [i for _, i, _ in self._pieces(text)]

    def _ids(self, text: str) -> list[int]:
        body = self.piece_ids(text)[: self.max_len - 2]
        return [BOS_ID, *body, EOS_ID]

    def _pieces(self, text: str) -> list[tuple[str, int, tuple[int, int]]]:
        """(piece, BEiT-3 id, character span in the cleaned text) for every piece."""
        if not isinstance(text, str):
            raise UserError(f"expression must be a string, got {type(text).__name__}: {text!r}")
        cleaned = clean_expression(text)
        if not cleaned:
            raise UserError(f"expression {text!r} is empty after cleaning (lower-case, punctuation removed)")
        proto = self.sp.encode(cleaned, return_type="proto")
        # sentencepiece reports byte offsets; map them to character offsets for users of str slicing
        char_at_byte = _byte_to_char(cleaned)
        out = []
        for p in proto.pieces:
            if p.begin == p.end:  # a bare word-boundary marker with no surface text (before an unknown span)
                start = end = char_at_byte[p.begin]
            else:
                start, end = char_at_byte[p.begin], char_at_byte[p.end]
            out.append((p.piece, _to_beit3_id(p.id), (start, end)))
        return out


VOCAB_ADVICE = "set model.overrides.encoder.vocab_size to at least {ids}"


def check_vocab(rows: int, tokenizer: BEiT3Tokenizer, advice: str = VOCAB_ADVICE) -> None:
    """The model's text embedding (``rows`` ids) must have a row for every id ``tokenizer`` can produce; otherwise a
    ``UserError`` naming the tokenizer ends with ``advice`` (``{ids}``: the tokenizer's id count)."""
    if tokenizer.vocab_size > rows:
        raise UserError(
            f"{tokenizer.path}: {tokenizer.vocab_size} token ids but the model's text embedding has {rows} rows; "
            + advice.format(ids=tokenizer.vocab_size)
        )


def _to_beit3_id(spm_id: int) -> int:
    return UNK_ID if spm_id == _SPM_UNK else spm_id + 1


def _byte_to_char(text: str) -> list[int]:
    """Index i -> number of characters whose UTF-8 encoding ends at or before byte i (len = bytes + 1)."""
    table = [0]
    for n, ch in enumerate(text, start=1):
        table.extend([n - 1] * (len(ch.encode("utf-8")) - 1))
        table.append(n)
    return table


def _load_model(path: Path) -> spm.SentencePieceProcessor:
    if not path.is_file():
        raise UserError(f"{path}: tokenizer model not found")
    sp = spm.SentencePieceProcessor()
    try:
        sp.load(str(path))
    except (OSError, RuntimeError) as exc:
        raise UserError(f"{path}: not a readable sentencepiece model ({exc})") from exc
    layout_ok = (
        sp.get_piece_size() > 3
        and sp.unk_id() == _SPM_UNK
        and all(sp.is_control(i) or sp.is_unused(i) for i in (_SPM_BOS, _SPM_EOS))
    )
    if not layout_ok:
        raise UserError(f"{path}: sentencepiece ids 0, 1, 2 must be <unk>, <s>, </s> (the XLM-R / BEiT-3 layout)")
    return sp


def train_tokenizer(
    lines: Iterable[str],
    out_path: str | Path,
    vocab_size: int,
    model_type: str = "bpe",
    character_coverage: float = 1.0,
) -> Path:
    """Train a sentencepiece model with BEiT-3's reserved-id layout; writes ``out_path`` and its ``.vocab``.

    Lines are cleaned like expressions first. ``vocab_size`` is an upper bound (a tiny corpus yields fewer pieces).
    BPE is the default because sentencepiece's unigram trainer, on small templated corpora, stops after a few dozen
    mostly single-character pieces whatever the requested size. One thread and a fixed seed make the file a
    function of the lines alone.
    """
    if model_type not in ("unigram", "bpe"):
        raise UserError(f"tokenizer model type must be 'unigram' or 'bpe', got {model_type!r}")
    if vocab_size < 8:
        raise UserError(f"--vocab-size must be at least 8, got {vocab_size}")
    corpus = [c for c in (clean_expression(line) for line in lines) if c]
    if not corpus:
        raise UserError("tokenizer corpus has no non-empty line")
    out_path = Path(out_path)
    buffer = io.BytesIO()
    spm.set_random_generator_seed(1234)
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(corpus),
            model_writer=buffer,
            vocab_size=vocab_size,
            model_type=model_type,
            character_coverage=character_coverage,
            unk_id=_SPM_UNK,
            bos_id=_SPM_BOS,
            eos_id=_SPM_EOS,
            pad_id=-1,
            byte_fallback=False,
            hard_vocab_limit=False,
            num_threads=1,
            minloglevel=2,
        )
    except RuntimeError as exc:
        raise UserError(f"sentencepiece training failed for {out_path}: {exc}") from exc
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_bytes(buffer.getvalue())
    _write_vocab(buffer.getvalue(), out_path.with_suffix(".vocab"))
    return out_path


def _write_vocab(model: bytes, path: Path) -> None:
    """sentencepiece's ``.vocab`` text (piece TAB score), which ``model_writer`` training does not produce."""
    sp = spm.SentencePieceProcessor(model_proto=model)
    rows = [f"{sp.id_to_piece(i)}\t{sp.get_score(i):g}" for i in range(sp.get_piece_size())]
    path.write_text("\n".join(rows) + "\n", encoding="utf-8")


def train_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``simvg tokenizer train``."""
    parser.add_argument("--corpus", required=True, type=Path, help="UTF-8 text file, one expression per line")
    parser.add_argument("--out", required=True, type=Path, help="model file to write (X.spm; X.vocab beside it)")
    parser.add_argument("--vocab-size", required=True, type=int, help="upper bound on the number of pieces")
    parser.add_argument("--model-type", choices=("bpe", "unigram"), default="bpe", help="sentencepiece algorithm")
    parser.add_argument("--character-coverage", type=float, default=1.0, help="share of characters kept as pieces")


def train_command(args: argparse.Namespace) -> int:
    """Train a model from ``--corpus`` and print where it went."""
    if not args.corpus.is_file():
        raise UserError(f"{args.corpus}: corpus file not found")
    try:
        lines = args.corpus.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as exc:
        raise UserError(f"{args.corpus}: not UTF-8 text ({exc.reason} at byte {exc.start})") from exc
    if not 0.5 <= args.character_coverage <= 1.0:
        raise UserError(f"--character-coverage must be in [0.5, 1], got {args.character_coverage}")
    out = train_tokenizer(lines, args.out, args.vocab_size, args.model_type, args.character_coverage)
    sp = spm.SentencePieceProcessor(model_file=str(out))
    print(f"wrote {out} ({sp.get_piece_size()} pieces, BEiT-3 vocab size {sp.get_piece_size() + 2})")
    return 0
