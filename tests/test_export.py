"""ONNX export: the CLI, the files beside the graph, dynamic batch, parity with eager PyTorch within 1e-4."""

from __future__ import annotations

import os
import shutil
import stat

import onnx
import pytest
import torch
import yaml
from grounding_helpers import scene

from simvg.cli import main
from simvg.errors import UserError
from simvg.export import onnx as onnx_export
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


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
@pytest.mark.parametrize("fault", ["parity", "crash", "int8"])
def test_a_failing_export_leaves_the_earlier_file_intact(folder, tmp_path, monkeypatch, fault):
    """The graph is built and checked beside --out and renamed over it only when whole and checked: a parity error
    (fp32 or int8) or a crash half-way through writing it changes nothing at --out and leaves no temporary behind."""
    out = tmp_path / "model.onnx"
    out.write_bytes(b"the earlier export")
    args = ["export", "onnx", "--checkpoint", str(folder), "--branch", "token", "--out", str(out)]
    if fault == "parity":
        monkeypatch.setattr(onnx_export, "TOLERANCE", -1.0)  # every graph now "differs"
    elif fault == "int8":
        monkeypatch.setattr(onnx_export, "INT8_TOLERANCE", -1.0)
        args.append("--int8")
    else:
        real_export = torch.onnx.export

        def torn(module, inputs, path, **kwargs):  # writes part of a graph, then dies
            real_export(module, inputs, path, **kwargs)
            with open(path, "r+b") as f:
                f.truncate(100)
            raise RuntimeError("killed while writing the graph")

        monkeypatch.setattr(torch.onnx, "export", torn)
    if fault == "crash":
        with pytest.raises(RuntimeError, match="killed while writing"):
            main(args)
    else:
        assert main(args) == 2
    assert out.read_bytes() == b"the earlier export"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx"]  # no staging folder, no model.yaml


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_export_writes_an_ordinary_file_and_names_an_unwritable_path(folder, tmp_path, capsys):
    out = tmp_path / "model.onnx"
    out.write_bytes(b"the earlier export")
    assert main(["export", "onnx", "--checkpoint", str(folder), "--branch", "token", "--out", str(out)]) == 0
    assert onnx.load(str(out)).metadata_props  # replaced by the new graph
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(out.stat().st_mode) == 0o666 & ~umask  # not mkstemp's 0600
    capsys.readouterr()
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    bad = blocker / "model.onnx"  # its folder is a file: nothing can be written there, not even by root
    assert main(["export", "onnx", "--checkpoint", str(folder), "--out", str(bad)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(bad) in err and "cannot write" in err and "Traceback" not in err
