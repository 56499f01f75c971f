"""BEiT3Tokenizer: id layout, cleaning, truncation, padding, offsets, odd scripts, errors; tokenizer training."""

import io
import itertools

import pytest
import sentencepiece as spm
import torch

from simvg.cli import main
from simvg.data.tokenizer import BEiT3Tokenizer, clean_expression, train_tokenizer
from simvg.errors import UserError

COLOURS = ["red", "green", "blue", "yellow"]
SHAPES = ["circle", "square", "star", "triangle"]
RELATIONS = ["left of", "right of", "above", "below"]
CORPUS = [
    f"the {a} {b} {r} the {c} {d}"
    for a, b, r, c, d in itertools.product(COLOURS, SHAPES, RELATIONS, COLOURS[:2], SHAPES[:2])
]


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    return train_tokenizer(CORPUS, tmp_path_factory.mktemp("tok") / "toy.spm", 64, model_type="bpe")


@pytest.fixture(scope="module")
def tok(model_path):
    return BEiT3Tokenizer(model_path, max_len=8)


@pytest.fixture(scope="module")
def sp(model_path):
    return spm.SentencePieceProcessor(model_file=str(model_path))


def test_cleaning_follows_simvg():
    assert clean_expression("The Man's (red) hat!") == "the mans red hat"
    assert clean_expression("left-most/top  one.") == "left most top one"
    assert clean_expression('  "a,b;c:d#e*f?"  ') == "abcdef"
    assert clean_expression("?!.") == ""


def test_reserved_pieces_and_offset(tok, sp):
    assert [sp.id_to_piece(i) for i in range(3)] == ["<unk>", "<s>", "</s>"]
    pieces = tok.tokenize("the red circle")
    assert pieces == ["▁the", "▁red", "▁circle"]
    assert tok.piece_ids("the red circle") == [sp.piece_to_id(p) + 1 for p in pieces]
    assert min(tok.piece_ids("the red circle")) >= 4  # 0-3 are <s>, <pad>, </s>, <unk>
    assert tok.vocab_size == sp.get_piece_size() + 2


def test_encode_one_wraps_and_pads(tok):
    ids, mask = tok.encode_one("The RED circle.")
    body = tok.piece_ids("the red circle")
    assert ids.tolist() == [0, *body, 2, 1, 1, 1]
    assert mask.tolist() == [False] * 5 + [True] * 3
    assert ids.dtype == torch.long and mask.dtype == torch.bool


def test_truncation_keeps_bos_eos(tok):
    text = "the red circle left of the green star"
    body = tok.piece_ids(text)
    assert len(body) > 6
    ids, mask = tok.encode_one(text)
    assert ids.tolist() == [0, *body[:6], 2]
    assert not mask.any()


def test_batch_right_padding(tok):
    ids, mask = tok(["the star", "the red circle", "blue"])
    assert ids.shape == mask.shape == (3, 8)
    assert torch.equal(mask, ids.eq(1))
    lengths = (~mask).sum(1).tolist()
    assert lengths == [2 + len(tok.piece_ids(t)) for t in ["the star", "the red circle", "blue"]]
    for row, n in zip(ids.tolist(), lengths):
        assert row[0] == 0 and row[n - 1] == 2 and all(v == 1 for v in row[n:])


def test_offsets_are_character_spans_of_cleaned_text(tok):
    assert tok.offsets("Red circle") == [(0, 3), (3, 10)]
    text = "The green-square, left of the BLUE star!"
    cleaned = clean_expression(text)
    spans = tok.offsets(text)
    assert "".join(cleaned[a:b] for a, b in spans) == cleaned
    assert all(a <= b for a, b in spans) and all(b0 <= a1 for (_, b0), (a1, _) in zip(spans, spans[1:]))


@pytest.mark.parametrize("text", ["红色的圆", "الدائرة الحمراء", "the 🙂 star", "ñandú über café", "a\u200bb"])
def test_other_scripts_never_crash(tok, text):
    ids, mask = tok.encode_one(text)
    assert ids[0] == 0 and int(ids.max()) < tok.vocab_size
    cleaned = clean_expression(text)
    spans = tok.offsets(text)
    assert len(spans) == len(tok.tokenize(text))
    assert all(0 <= a <= b <= len(cleaned) for a, b in spans)


def test_unknown_characters_map_to_unk(tok, sp):
    # byte fallback is off: an unseen character is one <unk> (spm id 0 -> 3) after a bare word-boundary piece
    assert tok.piece_ids("红") == [sp.piece_to_id("▁") + 1, 3]
    assert tok.offsets("红") == [(0, 0), (0, 1)]
    ids = tok.piece_ids("红色 the 🙂 star")
    assert ids.count(3) == 2 and tok.tokenize("红色 the 🙂 star")[1] == "红色"


@pytest.mark.parametrize("text", ["", "   ", "?!.", "()"])
def test_empty_expressions_are_user_errors(tok, text):
    with pytest.raises(UserError, match="empty after cleaning") as info:
        tok.encode_one(text)
    assert repr(text) in str(info.value)


def test_missing_and_corrupt_model_files(tmp_path):
    with pytest.raises(UserError, match="nothere.spm"):
        BEiT3Tokenizer(tmp_path / "nothere.spm")
    bad = tmp_path / "bad.spm"
    bad.write_bytes(b"not a model")
    with pytest.raises(UserError, match="bad.spm"):
        BEiT3Tokenizer(bad)


def test_model_with_other_id_layout_is_rejected(tmp_path):
    buffer = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS), model_writer=buffer, vocab_size=40, model_type="bpe",
        unk_id=2, bos_id=-1, eos_id=-1, pad_id=-1, minloglevel=2,
    )  # fmt: skip
    path = tmp_path / "other.spm"
    path.write_bytes(buffer.getvalue())
    with pytest.raises(UserError, match="XLM-R"):
        BEiT3Tokenizer(path)


def test_max_len_too_small(model_path):
    with pytest.raises(UserError, match="max_len"):
        BEiT3Tokenizer(model_path, max_len=2)


def test_training_is_deterministic_and_writes_vocab(tmp_path):
    a = train_tokenizer(CORPUS, tmp_path / "a.spm", 50)
    b = train_tokenizer(CORPUS, tmp_path / "b.spm", 50)
    assert a.read_bytes() == b.read_bytes()
    vocab = (tmp_path / "a.vocab").read_text(encoding="utf-8").splitlines()
    assert [line.split("\t")[0] for line in vocab[:3]] == ["<unk>", "<s>", "</s>"]
    assert len(vocab) == BEiT3Tokenizer(a).vocab_size - 2


def test_training_errors(tmp_path):
    with pytest.raises(UserError, match="no non-empty line"):
        train_tokenizer(["", "?!"], tmp_path / "x.spm", 50)
    with pytest.raises(UserError, match="vocab-size"):
        train_tokenizer(CORPUS, tmp_path / "x.spm", 3)
    with pytest.raises(UserError, match="model type"):
        train_tokenizer(CORPUS, tmp_path / "x.spm", 50, model_type="wordpiece")


def test_cli_train(tmp_path, capsys):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(CORPUS) + "\n", encoding="utf-8")
    out = tmp_path / "m.spm"
    assert main(["tokenizer", "train", "--corpus", str(corpus), "--out", str(out), "--vocab-size", "60"]) == 0
    assert out.is_file() and (tmp_path / "m.vocab").is_file()
    assert "pieces" in capsys.readouterr().out
    assert BEiT3Tokenizer(out).tokenize("the red star")[0] == "▁the"


def test_cli_train_bad_input(tmp_path, capsys):
    out = str(tmp_path / "m.spm")
    assert main(["tokenizer", "train", "--corpus", str(tmp_path / "none.txt"), "--out", out, "--vocab-size", "60"]) == 2
    assert "none.txt" in capsys.readouterr().err
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("caf\xe9\n".encode("latin-1"))
    assert main(["tokenizer", "train", "--corpus", str(latin1), "--out", out, "--vocab-size", "60"]) == 2
    assert "UTF-8" in capsys.readouterr().err
    assert main(["tokenizer", "train", "--corpus", str(latin1), "--out", out, "--vocab-size", "x"]) == 2
