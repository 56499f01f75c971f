"""The training loop end to end on a tiny dataset: outputs, eval command and dump, GREC evaluation, stage-2 init,
non-finite loss stop, plotting, and the guard against overwriting a run."""

import dataclasses
import json
from pathlib import Path

import pytest
import torch
import yaml
from engine_data import make_config, make_dataset, write_config

from simvg.artifact import build_model, export_folder, init_weights
from simvg.cli import main
from simvg.config import load_config
from simvg.data.collate import Batch
from simvg.engine.evaluate import evaluate, gather_records, judge_batch, summarize
from simvg.engine.plot import plot_run
from simvg.engine.train import fit
from simvg.errors import UserError
from simvg.losses import SimVGLoss
from simvg.utils.checkpoint import clean_state_dict, load_checkpoint
from simvg.utils.logging import read_metrics


@pytest.fixture(scope="module")
def rec_data(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("rec"), "rec")


@pytest.fixture(scope="module")
def trained(rec_data, tmp_path_factory):
    """One short run (2 epochs x 4 steps) shared by the tests below."""
    cfg = make_config(rec_data, tmp_path_factory.mktemp("runs") / "run", ema=True)
    result = fit(cfg)
    return cfg, result


def test_fit_writes_checkpoints_config_and_metrics(trained):
    cfg, result = trained
    out = cfg.train.output_dir
    assert result["step"] == 8 and result["epoch"] == 2
    ckpt = load_checkpoint(f"{out}/last.pth")
    assert ckpt["step"] == 8 and ckpt["epoch"] == 2 and ckpt["epoch_step"] == 0
    assert ckpt["ema"]["updates"] == 8 and ckpt["config"]["train"]["ema"] is True
    assert load_checkpoint(f"{out}/best.pth")["best_metric"] == result["best_metric"]
    assert load_config(f"{out}/config.yaml") == cfg
    records = read_metrics(f"{out}/metrics.jsonl")
    train = [r for r in records if r["event"] == "train"]
    assert [r["step"] for r in train] == list(range(1, 9))
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in train)
    # per-step warm-up: factors 1/3, 2/3, then 1; milestone 6 -> 0.1 from the 6th step (i + 1 >= 6)
    assert [r["lr"] for r in train][:3] == pytest.approx([1e-3 / 3, 2e-3 / 3, 1e-3], rel=1e-4)
    assert train[5]["lr"] == pytest.approx(1e-4, rel=1e-4)
    val = [r for r in records if r["event"] == "val"]
    assert len(val) == 2 and {"val/decoder/acc", "val/token/acc", "score"} <= set(val[0])


def test_eval_command_matches_training_validation_and_dumps(trained, tmp_path, capsys):
    cfg, result = trained
    dump = tmp_path / "preds.jsonl"
    code = main(["eval", "--checkpoint", f"{cfg.train.output_dir}/last.pth", "--split", "val", "--dump", str(dump),
                 "--json"])  # fmt: skip
    assert code == 0
    metrics = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert metrics["decoder/acc"] == pytest.approx(result["metrics"]["val/decoder/acc"])
    assert metrics["token/acc"] == pytest.approx(result["metrics"]["val/token/acc"])
    lines = [json.loads(line) for line in dump.read_text().splitlines()]
    assert len(lines) == 8 and len({r["sample_id"] for r in lines}) == 8
    first = lines[0]
    assert {"sample_id", "image_id", "expression", "gt_boxes", "decoder", "token"} <= set(first)
    assert len(first["decoder"]["box"]) == 4 and 0 <= first["decoder"]["iou"] <= 1
    # boxes are in original-image pixels (64x64 scenes)
    assert all(0 <= v <= 64 for r in lines for v in r["token"]["box"] + r["gt_boxes"][0])
    acc = 100 * sum(r["decoder"]["iou"] >= 0.5 for r in lines) / len(lines)
    assert acc == pytest.approx(metrics["decoder/acc"])


def test_eval_command_single_branch_and_human_output(trained, capsys):
    cfg, _ = trained
    code = main(["eval", "--checkpoint", f"{cfg.train.output_dir}/last.pth", "--split", "val", "--branch", "token",
                 "--weights", "raw"])  # fmt: skip
    assert code == 0
    out = capsys.readouterr().out
    assert "val: 8 expressions (REC, raw weights)" in out and "token" in out and "decoder" not in out


def test_rerun_into_existing_output_is_refused(trained, tmp_path):
    cfg, _ = trained
    path = write_config(cfg, tmp_path / "cfg.yaml")
    assert main(["train", str(path)]) == 2  # UserError: holds a run already


def test_init_from_loads_ema_or_raw_weights(trained):
    cfg, _ = trained
    ckpt = f"{cfg.train.output_dir}/last.pth"
    obj = load_checkpoint(ckpt)
    for use_ema in (False, True):
        model = build_model(cfg.model, cfg.data, with_weights=False)
        init_weights(model, ckpt, use_ema)
        expected = clean_state_dict(obj["ema"]["module"] if use_ema else obj["model"])
        assert all(torch.equal(v, expected[k]) for k, v in model.state_dict().items())


def test_init_from_without_ema_weights_is_a_user_error(trained, tmp_path):
    cfg, _ = trained
    obj = load_checkpoint(f"{cfg.train.output_dir}/last.pth")
    obj["ema"] = None
    torch.save(obj, tmp_path / "noema.pth")
    with pytest.raises(UserError, match="no EMA weights"):
        init_weights(build_model(cfg.model, cfg.data, with_weights=False), str(tmp_path / "noema.pth"), use_ema=True)


def test_init_from_warns_when_the_run_reads_another_tokenizer(trained, tmp_path, caplog):
    cfg, _ = trained
    ckpt = f"{cfg.train.output_dir}/last.pth"
    theirs = Path(cfg.data.root) / "tokenizer.spm"
    same, other = tmp_path / "same.spm", tmp_path / "other.spm"
    same.write_bytes(theirs.read_bytes())
    other.write_bytes(theirs.read_bytes() + b"x")
    for path, warned in ((same, False), (other, True)):
        caplog.clear()
        data = dataclasses.replace(cfg.data, tokenizer=str(path))
        init_weights(build_model(cfg.model, cfg.data, with_weights=False), ckpt, use_ema=False, data=data)
        warnings = [r.getMessage() for r in caplog.records if "tokenizer" in r.getMessage()]
        assert bool(warnings) is warned
        if warned:
            assert str(theirs) in warnings[0] and str(other) in warnings[0]


def test_init_from_a_run_at_another_image_size_resamples_the_vision_positions(trained, caplog):
    """A 64 px run's checkpoint starts a 128 px stage: the [3 + 4*4, D] position table becomes [3 + 8*8, D]; its
    three leading rows are copied, a constant patch grid stays constant, every other weight is loaded as it is."""
    cfg, _ = trained
    obj = load_checkpoint(f"{cfg.train.output_dir}/last.pth")
    key = "encoder.encoder.embed_positions.A.weight"
    table = clean_state_dict(obj["model"])[key]
    assert table.shape[0] == 3 + 4 * 4  # simvg_tiny_test: patch 16 at 64 px
    flat = table.clone()
    flat[3:] = torch.linspace(-1, 1, table.shape[1])  # every patch row the same vector
    obj["model"] = {**clean_state_dict(obj["model"]), key: flat}
    ckpt = Path(cfg.train.output_dir).parent / "flat_positions.pth"
    torch.save(obj, ckpt)
    encoder = {**cfg.model.overrides["encoder"], "img_size": 128}
    big = dataclasses.replace(cfg.model, overrides={**cfg.model.overrides, "encoder": encoder})
    model = build_model(big, cfg.data, with_weights=False)
    caplog.clear()
    init_weights(model, str(ckpt), use_ema=False)
    resized = model.state_dict()[key]
    assert resized.shape == (3 + 8 * 8, table.shape[1])
    assert torch.equal(resized[:3], flat[:3])
    assert torch.allclose(resized[3:], flat[3:4].expand(64, -1), atol=1e-5)  # bicubic keeps a constant a constant
    assert any("resized" in r.getMessage() and "[19, " in r.getMessage() for r in caplog.records)
    expected = obj["model"]
    assert all(torch.equal(v, expected[k]) for k, v in model.state_dict().items() if k != key)


def test_init_reset_starts_a_grec_model_from_a_rec_checkpoint(trained, caplog):
    cfg, _ = trained
    ckpt = f"{cfg.train.output_dir}/last.pth"
    grec = dataclasses.replace(
        cfg, model=dataclasses.replace(cfg.model, overrides={**cfg.model.overrides, "num_queries": 10})
    )
    with pytest.raises(UserError, match=r"tqg.query_embed.weight: checkpoint \(1, 32\), model \(10, 32\).*init_reset"):
        init_weights(build_model(grec.model, grec.data, with_weights=False), ckpt, use_ema=False)
    model = build_model(grec.model, grec.data, with_weights=False)
    fresh = model.tqg.query_embed.weight.detach().clone()
    caplog.clear()
    init_weights(model, ckpt, use_ema=False, reset=["tqg.query_embed"])
    assert torch.equal(model.tqg.query_embed.weight, fresh)
    expected = load_checkpoint(ckpt)["model"]
    loaded = {k: v for k, v in model.state_dict().items() if k != "tqg.query_embed.weight"}
    assert loaded and all(torch.equal(v, expected[k]) for k, v in loaded.items())
    messages = [r.getMessage() for r in caplog.records]
    assert any("1 keys keep their fresh initialisation" in m for m in messages)
    assert not any("missing" in m for m in messages)  # the reset key is not reported as missing too


def test_init_reset_prefix_must_name_a_weight(trained):
    cfg, _ = trained
    model = build_model(cfg.model, cfg.data, with_weights=False)
    with pytest.raises(UserError, match="init_reset: 'tqg.query' names no weight"):
        init_weights(model, f"{cfg.train.output_dir}/last.pth", use_ema=False, reset=["tqg.query"])


def test_plot_draws_png(trained, tmp_path):
    cfg, _ = trained
    out = plot_run(Path(cfg.train.output_dir), tmp_path / "curves.png")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_non_finite_loss_stops_with_one_error_and_keeps_last_checkpoint(rec_data, tmp_path, monkeypatch, capsys):
    cfg = make_config(rec_data, tmp_path / "run", checkpoint_every_steps=1)
    path = write_config(cfg, tmp_path / "cfg.yaml")
    original = SimVGLoss.forward
    calls = {"n": 0}

    def exploding(self, outputs, targets):
        losses = original(self, outputs, targets)
        calls["n"] += 1
        if calls["n"] == 3:
            losses["loss"] = losses["loss"] * float("nan")
        return losses

    monkeypatch.setattr(SimVGLoss, "forward", exploding)
    assert main(["train", str(path)]) == 1
    errors = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert len(errors) == 1 and "non-finite loss at epoch 0 step 3" in errors[0] and "loss_dgt=" in errors[0]
    assert load_checkpoint(tmp_path / "run" / "last.pth")["step"] == 2


class FixedModel(torch.nn.Module):
    """Returns preset outputs per call, whatever the input (for exact metric checks through ``evaluate``)."""

    def __init__(self, outputs):
        super().__init__()
        self.outputs = list(outputs)

    def forward(self, image, text_ids, text_pad_mask, branch="both"):
        out = self.outputs.pop(0)
        return {k: v for k, v in out.items() if branch in ("both", k)}


def grec_batch(gt_per_sample, offset=0):
    """A batch of 64x64 samples whose ground truth (xyxy pixels) is given per sample."""
    targets = []
    for i, gt in enumerate(gt_per_sample):
        targets.append({
            "size": torch.tensor([64, 64]), "orig_size": torch.tensor([64, 64]),
            "input_to_orig": torch.tensor([1.0, 1.0, 0.0, 0.0]), "orig_boxes": torch.tensor(gt).reshape(-1, 4),
            "image_id": offset + i, "sample_id": f"val/{offset + i}/0", "expression": "x",
        })  # fmt: skip
    n = len(targets)
    return Batch(torch.zeros(n, 3, 64, 64), torch.zeros(n, 4, dtype=torch.long), torch.zeros(n, 4, dtype=torch.bool),
                 targets)  # fmt: skip


def branch_out(boxes_xyxy_px, scores):
    """Model outputs for given boxes [B, Q, 4] in 64-px xyxy and object probabilities [B, Q]."""
    b = torch.tensor(boxes_xyxy_px, dtype=torch.float32) / 64
    cxcywh = torch.stack(((b[..., 0] + b[..., 2]) / 2, (b[..., 1] + b[..., 3]) / 2, b[..., 2] - b[..., 0],
                          b[..., 3] - b[..., 1]), -1)  # fmt: skip
    p = torch.tensor(scores, dtype=torch.float32).clamp(1e-6, 1 - 1e-6)
    logits = torch.stack((torch.log(p), torch.log1p(-p)), -1)  # softmax(...)[..., 0] == p
    return {"pred_logits": logits, "pred_boxes": cxcywh, "aux_outputs": []}


def test_evaluate_grec_counts_over_the_split():
    box, other = [0, 0, 32, 32], [32, 32, 64, 64]
    # batch 1: two target samples (correct, missed) and no no-target sample; batch 2: no-target rejected,
    # no-target with a false alarm, and a two-target sample with an extra box.
    b1 = grec_batch([[box], [box]])
    o1 = branch_out([[box, other], [other, other]], [[0.9, 0.1], [0.2, 0.1]])
    b2 = grec_batch([[], [], [box, other]], offset=2)
    o2 = branch_out([[box, box], [box, box], [box, other]], [[0.3, 0.1], [0.8, 0.1], [0.9, 0.9]])
    model = FixedModel([{"decoder": o1}, {"decoder": o2}])
    dump = []
    m = evaluate(model, [b1, b2], torch.device("cpu"), "grec", "decoder", dump=dump)
    assert m["num_samples"] == 5
    assert m["decoder/pr_f1"] == pytest.approx(100 * 3 / 5)  # samples 0, 2 and 4 are correct
    assert m["decoder/n_acc"] == pytest.approx(50.0)
    assert m["decoder/t_acc"] == pytest.approx(100 * 2 / 3)
    assert [r["decoder"]["kept"] for r in dump] == [1, 0, 0, 1, 2]


def test_evaluate_rec_is_per_sample_and_uses_original_pixels():
    gt = [0, 0, 32, 32]
    b1 = grec_batch([[gt], [gt], [gt]])
    b2 = grec_batch([[gt]], offset=3)
    hit, miss = [[0, 0, 32, 32], [40, 40, 60, 60]], [[40, 40, 60, 60], [0, 0, 32, 32]]
    o1 = branch_out([hit, hit, miss], [[0.9, 0.1]] * 3)  # third: argmax query is the wrong box
    o2 = branch_out([miss], [[0.9, 0.1]])
    model = FixedModel([{"decoder": o1, "token": o1}, {"decoder": o2, "token": o2}])
    m = evaluate(model, [b1, b2], torch.device("cpu"), "rec", "both")
    assert m["decoder/acc"] == pytest.approx(50.0)  # 2 of 4 (per-batch averaging would give (66.7 + 0) / 2)
    assert m["score"] == pytest.approx(50.0)


def test_records_are_deduplicated_by_sample_id():
    b = grec_batch([[[0, 0, 32, 32]]])
    out = {"decoder": branch_out([[[0, 0, 32, 32]]], [[0.9]])}
    records = judge_batch(out, b, "rec", {"score_threshold": 0.7, "match_threshold": 0.5, "match_metric": "giou"})
    assert len(gather_records(records + records)) == 1
    assert summarize(records, "rec", ["decoder"])["decoder/acc"] == 100.0


def test_config_file_round_trip_through_yaml(trained, tmp_path):
    cfg, _ = trained
    path = write_config(cfg, tmp_path / "c.yaml")
    assert yaml.safe_load(path.read_text())["train"]["ema"] is True
    assert load_config(path) == cfg


def test_synthref_smoke_recipe_end_to_end(tmp_path, capsys):
    """The committed smoke recipe on a fresh 16-image SynthRef: synth -> train -> eval -> plot, all via the CLI."""
    root, out = tmp_path / "synth", tmp_path / "run"
    synth = ["data", "synth", "--out", str(root), "--num-images", "16", "--image-size", "64", "--workers", "1"]
    assert main(synth) == 0
    config = str(Path(__file__).resolve().parent.parent / "configs" / "synthref_smoke.yaml")
    assert main(["train", config, "--set", f"data.root={root}", "--output", str(out)]) == 0
    assert (out / "best.pth").is_file() and (out / "config.yaml").is_file()
    capsys.readouterr()
    assert main(["eval", "--checkpoint", str(out / "best.pth"), "--split", "testB", "--json"]) == 0
    metrics = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert metrics["num_samples"] > 0 and 0 <= metrics["token/acc"] <= 100
    assert main(["plot", str(out)]) == 0 and (out / "curves.png").is_file()


def test_eval_of_exported_folder_matches_checkpoint(trained, tmp_path, capsys):
    cfg, _ = trained
    ckpt = f"{cfg.train.output_dir}/last.pth"
    folder = tmp_path / "export"
    export_folder(ckpt, folder)  # EMA weights, the ones "auto" evaluates in the checkpoint
    capsys.readouterr()
    assert main(["eval", "--checkpoint", ckpt, "--split", "val", "--json"]) == 0
    from_ckpt = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    # a model folder holds no dataset: the run's config names it
    run_config = f"{cfg.train.output_dir}/config.yaml"
    assert main(["eval", "--checkpoint", str(folder), "--config", run_config, "--split", "val", "--json"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == from_ckpt
    assert main(["eval", "--checkpoint", str(folder), "--split", "val"]) == 2
    assert "holds no dataset config; pass --config" in capsys.readouterr().err


def test_eval_of_a_folder_reads_the_folders_tokenizer_and_preprocessing(trained, tmp_path):
    from simvg.artifact import load_artifact
    from simvg.engine.commands import eval_config, match_model

    cfg, _ = trained
    folder = tmp_path / "export"
    export_folder(f"{cfg.train.output_dir}/last.pth", folder)
    run_config = Path(f"{cfg.train.output_dir}/config.yaml")
    loaded = load_artifact(folder)
    read = eval_config(folder, str(run_config), ["data.image_size=96"], None)
    match_model(read, loaded, [])
    assert read.data.tokenizer == str(folder / "tokenizer.spm") and read.data.image_size == 64  # the model's own
    other = tmp_path / "other.spm"
    overrides = [f"data.tokenizer={other}", "data.image_size=96"]
    read = eval_config(folder, str(run_config), overrides, None)
    match_model(read, loaded, overrides)
    assert read.data.tokenizer == str(other) and read.data.image_size == 96  # an explicit choice wins


@pytest.mark.parametrize("task", ["rec", "grec"])
def test_fit_with_dwbd_dynamic_dropout_and_drop_path(task, tmp_path):
    """Training with the loss and the randomness of the real recipes (DWBD ``distill_mode="dynamic"``, dropout 0.1,
    encoder drop-path): every step logs a DWBD weight in [0, 1] and loss = dgt + tgt + kd, and the run validates
    and keeps ``best.pth``. GREC batches mix images with 0, 1 and 2 targets: w is a mean over the matched pairs
    of the batch, so a no-target image adds nothing to it (a per-image mean would be NaN there and stop the run).
    """
    data = make_dataset(tmp_path / "data", task)
    out = tmp_path / "run"
    cfg = make_config(data, out, task, dropout=0.1, drop_path=0.2, distill_mode="dynamic", epochs=1)
    result = fit(cfg)
    assert result["step"] == 4 and result["best_metric"] is not None
    train = [r for r in read_metrics(out / "metrics.jsonl") if r["event"] == "train"]
    assert [r["step"] for r in train] == [1, 2, 3, 4]
    for r in train:
        assert 0.0 <= r["distill_w"] < 1.0 and r["loss_kd"] >= 0.0
        assert r["loss"] == pytest.approx(r["loss_dgt"] + r["loss_tgt"] + r["loss_kd"], rel=1e-5)
    assert any(r["distill_w"] > 0 and r["loss_kd"] > 0 for r in train)
    assert load_checkpoint(out / "best.pth")["best_metric"] == result["best_metric"]


# ----------------------------------------------------------------------------------------------------------------
# simvg eval: command-line options and --set agree; every eval.* field is used; --split all


def eval_args(*argv: str):
    import argparse

    from simvg.engine.commands import eval_arguments

    parser = argparse.ArgumentParser()
    eval_arguments(parser)
    return parser.parse_args(["--checkpoint", "x", *argv])


def settings_of(cfg, *argv: str, stored_eval: dict | None = None):
    """``eval_settings`` for ``argv`` over ``cfg`` (+ its ``--set`` values), and what it printed to stderr."""
    import contextlib
    import io

    from simvg.config import config_from_dict, to_dict
    from simvg.engine.commands import eval_settings

    args = eval_args(*argv)
    raw = to_dict(cfg)
    raw["eval"].update(stored_eval or {})
    read = config_from_dict(raw, args.overrides)
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        settings = eval_settings(args, read)
    return settings, read, err.getvalue()


def test_eval_options_win_over_set_and_say_so(trained):
    """Bites if an option is ignored, if a --set is ignored, or if either wins silently."""
    cfg, _ = trained
    s, _, err = settings_of(cfg, "--split", "val", "--set", "eval.branch=token", "--set", "eval.max_samples=5")
    assert (s.branch, s.max_samples, s.splits) == ("token", 5, ["val"]) and err == ""
    s, _, err = settings_of(cfg, "--split", "val", "--branch", "decoder", "--max-samples", "3",
                            "--set", "eval.branch=token", "--set", "eval.max_samples=5")  # fmt: skip
    assert (s.branch, s.max_samples) == ("decoder", 3)
    assert "--branch decoder wins over --set eval.branch" in err
    assert "--max-samples 3 wins over --set eval.max_samples" in err
    s, _, err = settings_of(cfg, "--split", "val", "--branch", "token")  # an option alone: nothing to say
    assert s.branch == "token" and err == ""


def test_eval_tokenizer_and_threads_options_win_over_set(trained, tmp_path):
    from simvg.engine.commands import eval_threads

    cfg, _ = trained
    mine, theirs = str(tmp_path / "a.spm"), str(tmp_path / "b.spm")
    _, read, err = settings_of(cfg, "--split", "val", "--tokenizer", mine, "--set", f"data.tokenizer={theirs}")
    assert read.data.tokenizer == mine and f"--tokenizer {mine} wins over --set data.tokenizer" in err
    _, read, err = settings_of(cfg, "--split", "val", "--threads", "2", "--set", "train.threads=3")
    assert "--threads 2 wins over --set train.threads" in err
    assert eval_threads(eval_args("--split", "val", "--threads", "2", "--set", "train.threads=3"), read) == 2
    args = eval_args("--split", "val", "--set", "train.threads=3")
    assert eval_threads(args, config_from_dict_of(cfg, args.overrides)) == 3  # a --set alone is used
    assert eval_threads(eval_args("--split", "val"), cfg) is None  # the training run's threads=1 is not


def config_from_dict_of(cfg, overrides):
    from simvg.config import config_from_dict, to_dict

    return config_from_dict(to_dict(cfg), overrides)


def test_eval_reports_a_set_it_does_not_read(trained):
    cfg, _ = trained
    _, _, err = settings_of(cfg, "--split", "val", "--set", "train.lr=0.1", "--set", "loss.token=0",
                            "--set", "data.flip_prob=0.5", "--set", "model.init_use_ema=true",
                            "--set", "data.test_splits=[train]", "--set", "train.device=cpu",
                            "--set", "data.root=" + cfg.data.root, "--set", "eval.iou_threshold=0.3")  # fmt: skip
    lines = err.splitlines()
    for key in ("train.lr", "loss.token", "data.flip_prob", "model.init_use_ema"):
        assert f"simvg eval: --set {key} has no effect on evaluation (training only)" in lines
    assert "simvg eval: --set data.test_splits has no effect on evaluation (read by --split all only)" in lines
    assert len(lines) == 5  # train.device, data.root and eval.iou_threshold are read: nothing said about them
    _, _, err = settings_of(cfg, "--split", "all", "--set", "data.test_splits=[train]")
    assert err == ""


def test_eval_reports_a_stored_validation_limit_instead_of_applying_it(trained):
    cfg, _ = trained
    s, _, err = settings_of(cfg, "--split", "val", stored_eval={"max_samples": 600})
    assert s.max_samples == 0 and "eval.max_samples 600 of the config is a validation limit" in err
    s, _, err = settings_of(cfg, "--split", "val", "--max-samples", "7", stored_eval={"max_samples": 600})
    assert s.max_samples == 7 and err == ""


def test_eval_split_all_is_val_then_test_splits(trained):
    from simvg.engine.commands import eval_splits

    cfg, _ = trained
    data = dataclasses.replace(cfg.data, val_splits=["val", "testB"], test_splits=["testA", "testB"])
    assert eval_splits("all", data) == ["val", "testB", "testA"]
    assert eval_splits("testA", data) == ["testA"]
    with pytest.raises(UserError, match="--split all: data.val_splits and data.test_splits are both empty"):
        eval_splits("all", dataclasses.replace(cfg.data, val_splits=[], test_splits=[]))


def test_eval_command_uses_every_eval_field_of_set(trained, monkeypatch, capsys):
    """Each ``--set eval.*`` value reaches the evaluation: batch size and sample limit the loader, the rest the
    ``evaluate`` call. Bites if any of them is dropped or replaced by the config's value."""
    import simvg.engine.commands as commands_module

    cfg, _ = trained
    calls = []

    def spy(model, loader, device, task, branch, **kw):
        calls.append({"loader": loader, "task": task, "branch": branch, **kw})
        return {"num_samples": float(len(loader.dataset)), "score": 0.0}

    monkeypatch.setattr(commands_module, "evaluate", spy)
    settings = {"batch_size": 3, "branch": "token", "iou_threshold": 0.25, "score_threshold": 0.4,
                "match_threshold": 0.6, "match_metric": "iou", "max_samples": 5}  # fmt: skip
    assert set(settings) == {f.name for f in dataclasses.fields(cfg.eval)}  # a new eval field needs a line here
    sets = [a for k, v in settings.items() for a in ("--set", f"eval.{k}={v}")]
    assert main(["eval", "--checkpoint", f"{cfg.train.output_dir}/last.pth", "--split", "val", *sets]) == 0
    (call,) = calls
    assert call["loader"].batch_size == 3 and len(call["loader"].dataset) == 5 and call["branch"] == "token"
    for key in ("iou_threshold", "score_threshold", "match_threshold", "match_metric"):
        assert call[key] == settings[key], key
    assert "simvg eval:" not in capsys.readouterr().err  # all read, nothing overridden


def test_eval_split_all_evaluates_val_and_test_splits(trained, tmp_path, capsys):
    """``--split all`` = each of data.val_splits then data.test_splits; the val figures equal ``--split val``'s, and
    every dump line says its split. (The tiny dataset has train and val only; train stands in for a test split.)"""
    cfg, _ = trained
    ckpt = f"{cfg.train.output_dir}/last.pth"
    assert main(["eval", "--checkpoint", ckpt, "--split", "val", "--json"]) == 0
    val = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    dump = tmp_path / "all.jsonl"
    assert main(["eval", "--checkpoint", ckpt, "--split", "all", "--json", "--set", "data.test_splits=[train]",
                 "--dump", str(dump)]) == 0  # fmt: skip
    both = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert list(both) == ["val", "train"] and both["val"] == val
    assert both["train"]["num_samples"] == 32  # 16 train entries x 2 expressions, each evaluated once
    lines = [json.loads(line) for line in dump.read_text().splitlines()]
    assert [r["split"] for r in lines] == ["val"] * 8 + ["train"] * 32
    assert main(["eval", "--checkpoint", ckpt, "--split", "all", "--set", "data.test_splits=[train]"]) == 0
    out = capsys.readouterr().out
    assert "val: 8 expressions" in out and "train: 32 expressions" in out


def test_train_output_option_wins_over_set_and_says_so(trained, tmp_path, capsys):
    """``--output`` beats ``--set train.output_dir`` (and says so): here it names the finished run's folder, so the
    command is refused as a rerun; had the ``--set`` won, a new run would have started in ``elsewhere``."""
    cfg, _ = trained
    path = write_config(cfg, tmp_path / "cfg.yaml")
    elsewhere = tmp_path / "elsewhere"
    code = main(["train", str(path), "--set", f"train.output_dir={elsewhere}", "--output", cfg.train.output_dir])
    assert code == 2 and not elsewhere.exists()
    assert f"simvg train: --output {cfg.train.output_dir} wins over --set train.output_dir" in capsys.readouterr().err
