"""ONNX export: the CLI, the files beside the graph, dynamic batch, parity with eager PyTorch within 1e-4."""

from __future__ import annotations

import shutil

import onnx
import pytest
import torch
import yaml
from grounding_helpers import scene

from simvg.cli import main
from simvg.errors import UserError
from simvg.inference.grounder import Grounder

TEXTS = ["the red circle on the left", "a", "all red shapes " * 5, "красный"]


@pytest.fixture(scope="module")
def exported(folder, tmp_path_factory):
    out = tmp_path_factory.mktemp("onnx")
    for branch in ("token", "decoder"):
        assert main(["export", "onnx", "--checkpoint", str(folder), "--branch", branch,
                     "--out", str(out / f"{branch}.onnx")]) == 0  # fmt: skip
    return out


def test_files_beside_the_graph_and_metadata(exported, folder):
    spec = yaml.safe_load((exported / "model.yaml").read_text())
    want = yaml.safe_load((folder / "model.yaml").read_text())
    assert spec == {**want, "branch": "decoder"}  # the spec of the last export, naming its branch
    assert (exported / "tokenizer.spm").read_bytes() == (folder / "tokenizer.spm").read_bytes()
    graph = onnx.load(str(exported / "token.onnx"))
    assert {p.key: p.value for p in graph.metadata_props} == {"simvg_format": "1", "branch": "token"}
    names = [i.name for i in graph.graph.input], [o.name for o in graph.graph.output]
    assert names == (["image", "text_ids", "text_pad_mask"], ["logits", "boxes"])
    assert graph.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"


@pytest.mark.parametrize("branch", ["token", "decoder"])
def test_onnx_matches_pytorch_on_a_new_batch_size(exported, folder, branch):
    eager = Grounder.from_checkpoint(folder, branch=branch)
    runtime = Grounder.from_checkpoint(exported / f"{branch}.onnx")  # an ONNX file answers with its own branch
    assert runtime.branch == branch
    images = [eager.open_image(scene(96 + 10 * i, 64)) for i in range(len(TEXTS))]
    tensors = torch.stack([_pre(eager, im) for im in images])
    ids, mask = eager.tokenizer(TEXTS)
    want = eager.runner(tensors, ids, mask, branch)
    got = runtime.runner(tensors, ids, mask, branch)
    for g, w in zip(got, want):
        assert g.shape == w.shape and (g - w).abs().max() <= 1e-4
    a, b = eager.ground_batch(images, TEXTS), runtime.ground_batch(images, TEXTS)
    for x, y in zip(a, b):
        torch.testing.assert_close(torch.tensor(x.boxes), torch.tensor(y.boxes), atol=1e-2, rtol=0)


def _pre(grounder, image):
    from simvg.data.transforms import preprocess

    return preprocess(image, grounder.spec.preprocess)[0]


def test_token_graph_has_no_decoder(exported):
    token = onnx.load(str(exported / "token.onnx"))
    decoder = onnx.load(str(exported / "decoder.onnx"))
    assert len(token.graph.node) < len(decoder.graph.node)
    assert not any(init.name.startswith("model.decoder.") for init in token.graph.initializer)
    assert any(init.name.startswith("model.decoder.") for init in decoder.graph.initializer)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # the legacy exporter announces its deprecation
def test_wrong_branch_and_foreign_graph_are_user_errors(exported, tmp_path):
    with pytest.raises(UserError, match="holds the token branch"):
        Grounder.from_checkpoint(exported / "token.onnx", branch="decoder", backend="onnx")
    for name in ("model.yaml", "tokenizer.spm"):
        shutil.copy(exported / name, tmp_path / name)
    torch.onnx.export(torch.nn.Linear(2, 2), (torch.zeros(1, 2),), str(tmp_path / "other.onnx"), dynamo=False)
    with pytest.raises(UserError, match="not an ONNX model exported by 'simvg export onnx'"):
        Grounder.from_checkpoint(tmp_path / "other.onnx", backend="onnx")
    (tmp_path / "broken.onnx").write_bytes(b"\x08\x07garbage")
    with pytest.raises(UserError, match="not a loadable ONNX model"):
        Grounder.from_checkpoint(tmp_path / "broken.onnx")


def test_export_cli_errors(folder, tmp_path, capsys):
    assert main(["export", "onnx", "--checkpoint", str(folder), "--out", str(tmp_path / "model.bin")]) == 2
    assert "must end in .onnx" in capsys.readouterr().err
    assert main(["export", "onnx", "--checkpoint", str(tmp_path / "nope"), "--out", str(tmp_path / "m.onnx")]) == 2
    assert "checkpoint not found" in capsys.readouterr().err
