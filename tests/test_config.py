"""Config machinery: every committed recipe loads and is complete and current; bad keys and types are refused
with the key (and file) named; ``--set`` applies with YAML-typed values."""

import dataclasses
import importlib.util
import sys
from pathlib import Path

import pytest
import yaml

from simvg.config import (
    Config,
    ModelSection,
    apply_overrides,
    config_changes,
    config_from_dict,
    dump_config,
    load_config,
    model_settings,
    parse_override,
    to_dict,
)
from simvg.errors import UserError

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
YAMLS = sorted(CONFIGS.glob("*.yaml"))


def load_generator():
    spec = importlib.util.spec_from_file_location("configs_generate", CONFIGS / "generate.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses resolve string annotations through the module's entry
    spec.loader.exec_module(module)
    return module


def test_configs_folder_holds_every_recipe():
    names = {p.stem for p in YAMLS}
    for stem in ("refcoco", "refcocoplus", "refcocog_umd", "refcocog_google", "referit", "flickr30k"):
        for backbone in ("b32", "l32"):
            for mode in ("onestage", "twostage_1", "twostage_2"):
                assert f"{stem}_{backbone}_{mode}" in names
    assert {"grefcoco_b32_onestage", "grefcoco_b32_twostage_1", "grefcoco_b32_twostage_2"} <= names
    assert {"pretrain_mixed_b32", "pretrain_cocoall_b32", "synthref_rec", "synthref_grec", "synthref_smoke"} <= names
    for target in ("refcoco", "refcocoplus", "refcocog_umd"):
        for kind in ("finetune_mix", "finetune_cocoall", "distill_mix", "distill_cocoall"):
            assert f"{kind}_{target}_b32" in names


@pytest.mark.parametrize("path", YAMLS, ids=[p.stem for p in YAMLS])
def test_every_config_loads_and_is_complete(path):
    cfg = load_config(path)
    # complete: the file spells out every field, so the resolved config has nothing the file does not show
    assert yaml.safe_load(path.read_text()) == yaml.safe_load(dump_config(cfg))
    assert cfg.train.output_dir == f"runs/{path.stem}"
    if cfg.model.init_from:
        assert cfg.model.init_from.startswith("runs/") and cfg.model.pretrained is None


def test_committed_files_match_the_generator():
    generator = load_generator()
    configs = generator.all_configs()
    assert sorted(configs) == [p.stem for p in YAMLS]
    for name, cfg in configs.items():
        assert (CONFIGS / f"{name}.yaml").read_text() == generator.render(name, cfg), name


def test_official_recipe_values():
    one = load_config(CONFIGS / "refcoco_b32_onestage.yaml")
    assert (one.train.lr, one.train.epochs, one.train.warmup, one.train.milestones) == (5e-4, 30, 3, [25])
    assert (one.loss.decoder, one.loss.token, one.loss.distill) == (1.0, 2.0, 1.0)
    assert one.train.clip_grad_norm == 0.15 and one.train.encoder_lr_scale == 0.1 and one.train.amsgrad
    stage1 = load_config(CONFIGS / "refcoco_b32_twostage_1.yaml")
    assert stage1.train.ema and stage1.train.batch_size == 16 and stage1.loss.token == 0 and stage1.loss.distill == 0
    assert not load_config(CONFIGS / "referit_b32_twostage_1.yaml").train.ema
    large = load_config(CONFIGS / "refcoco_l32_twostage_2.yaml")
    assert (large.train.lr, large.train.warmup, large.train.milestones, large.loss.token, large.loss.distill) == (
        1e-4, 0, [7], 1.0, 0.4)  # fmt: skip
    grec = load_config(CONFIGS / "grefcoco_b32_onestage.yaml")
    assert model_settings(grec.model).num_queries == 10 and not grec.data.lsj and grec.train.eval_start_epoch == 50
    assert load_config(CONFIGS / "finetune_cocoall_refcoco_b32.yaml").train.lr == 2e-4
    mixed = load_config(CONFIGS / "pretrain_mixed_b32.yaml")  # best checkpoint on the official five splits
    assert mixed.data.val_splits == ["val_refcoco_unc", "val_refcocoplus_unc", "val_refcocog_umd",
                                     "val_referitgame_berkeley", "val_flickr30k"]  # fmt: skip
    for path in YAMLS:  # the official runs train in fp32 (use_fp16=False); only SynthRef opts into bf16
        cfg = load_config(path)
        assert (cfg.train.amp == "none") or cfg.data.dataset == "synthref", path.name


def write(tmp_path, data):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_unknown_key_is_named_with_the_file(tmp_path):
    path = write(tmp_path, {"train": {"lr": 1e-3, "lrr": 1}})
    with pytest.raises(UserError, match=r"c\.yaml: train\.lrr: unknown key"):
        load_config(path)
    with pytest.raises(UserError, match=r"c\.yaml: optim: unknown key"):
        load_config(write(tmp_path, {"optim": {}}))
    with pytest.raises(UserError, match=r"model\.overrides\.foo: unknown key"):
        load_config(write(tmp_path, {"model": {"preset": "simvg_tiny_test", "overrides": {"foo": 1}}}))


@pytest.mark.parametrize(
    "section, message",
    [
        ({"train": {"epochs": "ten"}}, r"train\.epochs: expected int, got 'ten'"),
        ({"train": {"epochs": 1.5}}, r"train\.epochs: expected int"),
        ({"train": {"ema": 1}}, r"train\.ema: expected bool"),
        ({"train": {"amp": "fp8"}}, r"train\.amp: must be one of"),
        ({"train": {"milestones": [5, "x"]}}, r"train\.milestones\[1\]: expected int"),
        ({"eval": {"branch": "both!"}}, r"eval\.branch"),
        ({"model": {"overrides": {"encoder": {"depth": "deep"}}}}, r"model\.overrides\.encoder\.depth"),
        ({"data": "refcoco"}, r"data: expected a mapping"),
    ],
)
def test_wrong_types_are_named(tmp_path, section, message):
    with pytest.raises(UserError, match=message):
        load_config(write(tmp_path, section))


def test_set_overrides_apply_with_yaml_types(tmp_path):
    path = write(tmp_path, {"train": {"lr": 1e-3}})
    cfg = load_config(path, ["train.lr=3e-4", "train.milestones=[4, 8]", "train.ema=true",
                             "model.overrides.num_queries=10", "model.init_from=runs/x/best.pth"])  # fmt: skip
    assert cfg.train.lr == 3e-4 and cfg.train.milestones == [4, 8] and cfg.train.ema is True
    assert cfg.model.overrides == {"num_queries": 10} and cfg.model.init_from == "runs/x/best.pth"
    assert load_config(path).train.lr == 1e-3  # the file itself is untouched
    with pytest.raises(UserError, match=r"--set train\.lrr=1: unknown key train\.lrr"):
        load_config(path, ["train.lrr=1"])
    with pytest.raises(UserError, match="expected key=value"):
        load_config(path, ["train.lr"])
    with pytest.raises(UserError, match=r"train\.lr: expected float, got 'fast'"):
        load_config(path, ["train.lr=fast"])


def test_parse_override_and_nested_creation():
    assert parse_override("a.b=[1, 2]") == (["a", "b"], [1, 2])
    assert parse_override("x=") == (["x"], "")
    nested = apply_overrides({}, ["model.overrides.encoder.depth=2"])
    assert nested == {"model": {"overrides": {"encoder": {"depth": 2}}}}


def test_model_settings_merge_overrides_into_the_preset():
    settings = model_settings(ModelSection("simvg_tiny_test", {"encoder": {"depth": 3}, "num_queries": 10}))
    assert settings.encoder.depth == 3 and settings.encoder.embed_dim == 64 and settings.num_queries == 10
    assert model_settings(ModelSection("simvg_tiny_test", {"encoder.depth": 1})).encoder.depth == 1
    with pytest.raises(UserError, match="model.preset"):
        model_settings(ModelSection("simvg_huge"))


def test_round_trip_through_plain_dict():
    cfg = Config()
    again = config_from_dict(to_dict(cfg))
    assert again == cfg and dataclasses.asdict(again) == dataclasses.asdict(cfg)


def test_every_config_field_is_read_by_the_code():
    """A field that no code reads is a setting that silently does nothing (``data.test_splits`` was one). Each
    field of the experiment config must be read somewhere in ``simvg/``: as an attribute (``.name``), or by name as
    a string (``getattr``, ``"name"``), on a line other than its own definition. Bites on a new field left unread
    (or on a reader deleted), e.g. the old ``test_splits`` appeared on its definition line only."""
    import re

    from simvg.config import DataConfig, EvalConfig, LossConfig, TrainConfig

    package = CONFIGS.parent / "simvg"
    lines = [line for path in sorted(package.rglob("*.py")) for line in path.read_text().splitlines()]
    unread = []
    for cls in (ModelSection, DataConfig, LossConfig, TrainConfig, EvalConfig):
        for f in dataclasses.fields(cls):
            definition = re.compile(rf"^\s+{f.name}\s*:")
            use = re.compile(rf"\.{f.name}\b|[\"']{f.name}[\"']")
            if not any(use.search(line) and not definition.match(line) for line in lines):
                unread.append(f"{cls.__name__}.{f.name}")
    assert not unread, f"config fields no code reads: {unread}"


def test_model_overrides_are_type_checked_then_resolved_by_the_models_package():
    """``model_settings`` converts an int given for a float field (YAML ``0``) and leaves the merging to
    ``simvg.models.model_config``: dotted keys and nested dicts land in the preset's encoder, the rest of the preset
    stays. Bites if the conversion is dropped (an int drop-path rate would be stored) or a key is lost."""
    settings = model_settings(ModelSection("simvg_tiny_test", {"encoder.drop_path_rate": 0, "dropout": 0,
                                                               "encoder": {"depth": 3}}))  # fmt: skip
    assert settings.encoder.drop_path_rate == 0.0 and isinstance(settings.encoder.drop_path_rate, float)
    assert settings.dropout == 0.0 and isinstance(settings.dropout, float)
    assert (settings.encoder.depth, settings.encoder.embed_dim, settings.num_queries) == (3, 64, 1)  # tiny preset
    with pytest.raises(UserError, match=r"model\.overrides\.encoder\.depthh: unknown key"):
        model_settings(ModelSection("simvg_tiny_test", {"encoder.depthh": 1}))


def test_config_changes_name_the_dotted_keys_that_differ():
    old = {"train": {"lr": 0.1, "epochs": 3}, "data": {"root": "a"}}
    new = {"train": {"lr": 0.2, "epochs": 3}, "data": {"root": "a"}, "eval": {"branch": "token"}}
    assert config_changes(old, new) == ["eval", "train.lr"]
