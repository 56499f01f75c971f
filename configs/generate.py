"""Write every experiment YAML in ``configs/`` from the recipe table of the official release (docs/design.md).

The YAML files are committed and complete (no inheritance); this script only keeps them consistent. Run
``python configs/generate.py`` after changing a recipe or a config default; ``tests/test_config.py`` fails when a
committed file differs from what this script writes.

Paths follow one convention: datasets under ``data/`` (``data.root``), BEiT-3 weights and ``beit3.spm`` under
``pretrain_weights/``, runs under ``runs/<config name>/`` (stage 2 and fine-tuning start from the ``best.pth`` of
the run they name).
"""

from __future__ import annotations

import dataclasses
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from simvg.config import Config, DataConfig, EvalConfig, LossConfig, ModelSection, TrainConfig, dump_config
from simvg.synthref.scene import EASY_BACKGROUND, EASY_MAX_OBJECTS, STARTER_MAX_OBJECTS

HERE = Path(__file__).resolve().parent
BEIT3 = {"b32": "pretrain_weights/beit3_base_patch16_224.pth", "l32": "pretrain_weights/beit3_large_patch16_224.pth"}
SPM = "pretrain_weights/beit3.spm"
REC_DATASETS = {  # file-name stem -> dataset name, validation splits (test splits for `simvg eval`)
    "refcoco": ("refcoco", ["val"], ["testA", "testB"]),
    "refcocoplus": ("refcoco+", ["val"], ["testA", "testB"]),
    "refcocog_umd": ("refcocog_umd", ["val"], ["test"]),
    "refcocog_google": ("refcocog_google", ["val"], []),
    "referit": ("referit", ["val"], ["test"]),
    "flickr30k": ("flickr30k", ["val"], ["test"]),
}
FINETUNE_TARGETS = ("refcoco", "refcocoplus", "refcocog_umd")
# The official mixed pre-training validates on these five splits; its best checkpoint is picked on their mean.
MIXED_VALS = ["val_refcoco_unc", "val_refcocoplus_unc", "val_refcocog_umd", "val_referitgame_berkeley", "val_flickr30k"]


def loss(dwbd: tuple[float, float] | None) -> LossConfig:
    """Decoder on ground truth (weight 1) plus, when given, DWBD with (token, distill) weights."""
    if dwbd is None:
        return LossConfig(decoder=1.0, token=0.0, distill=0.0)
    return LossConfig(decoder=1.0, token=dwbd[0], distill=dwbd[1], distill_mode="dynamic")


@dataclass
class Recipe:
    """One row of the official recipe table (docs/design.md O4.2): what differs between the released configs.

    ``dwbd`` is the (token, distill) loss weights, None for the decoder alone (stage 1, pre-training,
    fine-tuning); ``init_from`` names the run whose ``best.pth`` starts this one (then no BEiT-3 weights are read,
    else ``backbone`` picks them); ``train`` holds any other ``TrainConfig`` field. Runs are in fp32 like the
    official ones (use_fp16=False); bf16 autocast is an opt-in (--set train.amp=bf16).
    """

    name: str
    preset: str
    data: DataConfig
    dwbd: tuple[float, float] | None
    lr: float
    epochs: int
    warmup: int
    milestones: list[int]
    batch: int
    ema: bool = False
    init_from: str | None = None
    backbone: str = "b32"
    train: dict[str, Any] = field(default_factory=dict)

    def config(self) -> Config:
        model = ModelSection(
            preset=self.preset,
            pretrained=None if self.init_from else BEIT3[self.backbone],
            init_from=f"runs/{self.init_from}/best.pth" if self.init_from else None,
        )
        settings = dict(output_dir=f"runs/{self.name}", lr=self.lr, epochs=self.epochs, warmup=self.warmup,
                        milestones=self.milestones, batch_size=self.batch, ema=self.ema, amp="none")  # fmt: skip
        settings.update(self.train)
        return Config(
            model=model, data=self.data, loss=loss(self.dwbd), train=TrainConfig(**settings), eval=EvalConfig()
        )


def rec_data(stem: str, **kw: object) -> DataConfig:
    dataset, vals, tests = REC_DATASETS[stem]
    return DataConfig(dataset=dataset, tokenizer=SPM, val_splits=vals, test_splits=tests, **kw)


def vit_b_single() -> list[Recipe]:
    rows = []
    for stem in REC_DATASETS:
        small = stem in ("referit", "flickr30k")  # batch 32 and no EMA in their stage 1
        data = rec_data(stem)
        rows += [
            Recipe(f"{stem}_b32_onestage", "simvg_b32", data, dwbd=(2.0, 1.0), lr=5e-4, epochs=30, warmup=3,
                   milestones=[25], batch=32),
            Recipe(f"{stem}_b32_twostage_1", "simvg_b32", data, dwbd=None, lr=5e-4, epochs=30, warmup=3,
                   milestones=[25], batch=32 if small else 16, ema=not small),
            Recipe(f"{stem}_b32_twostage_2", "simvg_b32", data, dwbd=(2.0, 1.0), lr=3e-4, epochs=20, warmup=3,
                   milestones=[15], batch=32, init_from=f"{stem}_b32_twostage_1"),
        ]  # fmt: skip
    grec = DataConfig(dataset="grefcoco", tokenizer=SPM, lsj=False, val_splits=["val"], test_splits=["testA", "testB"])
    every2 = dict(eval_every_epochs=2, eval_start_epoch=50)
    return rows + [
        Recipe("grefcoco_b32_onestage", "simvg_b32_grec", grec, dwbd=(2.0, 1.0), lr=5e-4, epochs=200, warmup=3,
               milestones=[180], batch=32, train=every2),
        Recipe("grefcoco_b32_twostage_1", "simvg_b32_grec", grec, dwbd=None, lr=5e-4, epochs=200, warmup=3,
               milestones=[180], batch=32, train=every2),
        Recipe("grefcoco_b32_twostage_2", "simvg_b32_grec", grec, dwbd=(2.0, 1.0), lr=5e-4, epochs=100, warmup=3,
               milestones=[90], batch=32, init_from="grefcoco_b32_twostage_1", train=every2),
    ]  # fmt: skip


def vit_l_single() -> list[Recipe]:
    rows = []
    for stem in REC_DATASETS:
        dwbd = (2.0, 1.0) if stem == "referit" else (1.0, 0.4)
        data = rec_data(stem)
        rows += [
            Recipe(f"{stem}_l32_onestage", "simvg_l32", data, dwbd=dwbd, lr=5e-4, epochs=30,
                   warmup=0 if stem == "refcocog_google" else 3, milestones=[25], batch=4, backbone="l32"),
            Recipe(f"{stem}_l32_twostage_1", "simvg_l32", data, dwbd=None, lr=5e-4, epochs=30, warmup=3,
                   milestones=[21, 27], batch=4, backbone="l32"),
            Recipe(f"{stem}_l32_twostage_2", "simvg_l32", data, dwbd=dwbd, lr=1e-4, epochs=10, warmup=0,
                   milestones=[7], batch=4, init_from=f"{stem}_l32_twostage_1", backbone="l32"),
        ]  # fmt: skip
    return rows


def mixed() -> list[Recipe]:
    """Pre-training on the mixture / COCO-only set, then fine-tuning or two-stage distillation (all ViT-B)."""
    # Both pre-training sets run at 640 px. The official pretrain-cocoall used 512, but its fine-tuning configs run
    # at 640 and a 512-px vision position table (259 rows) does not load into a 640-px model (403 rows): the
    # official flow breaks there (docs/design.md, "What differs").
    rows = [
        Recipe(name, "simvg_b32", DataConfig(dataset=dataset, tokenizer=SPM, lsj=False, val_splits=MIXED_VALS),
               dwbd=None, lr=5e-4, epochs=30, warmup=3, milestones=[21, 27], batch=32)
        for name, dataset in (("pretrain_mixed_b32", "mixed"), ("pretrain_cocoall_b32", "cocoall"))
    ]  # fmt: skip
    for stem in FINETUNE_TARGETS:
        for source, pre in (("mix", "pretrain_mixed_b32"), ("cocoall", "pretrain_cocoall_b32")):
            mix = source == "mix"
            rows += [
                Recipe(f"finetune_{source}_{stem}_b32", "simvg_b32", rec_data(stem), dwbd=None,
                       lr=2e-4 if source == "cocoall" and stem == "refcoco" else 1e-4, epochs=10, warmup=3,
                       milestones=[8], batch=32, init_from=pre),
                Recipe(f"distill_{source}_{stem}_b32", "simvg_b32", rec_data(stem),
                       dwbd=(2.0, 1.0) if mix else (1.0, 0.4), lr=3e-4, epochs=15 if mix else 20, warmup=3,
                       milestones=[10] if mix else [15], batch=32, init_from=pre),
            ]  # fmt: skip
    return rows


SYNTH = "simvg data synth --out data/{} --task {} --num-images {} --image-size {} --seed 0"
CONV = {"encoder.stem": "conv"}  # early convolutions: shapes are visible to a scratch encoder sooner (beit3.py)
EASY = f" --max-objects {EASY_MAX_OBJECTS} --background {EASY_BACKGROUND}"  # the embedded defaults' level
STARTER = f" --max-objects {STARTER_MAX_OBJECTS} --background {EASY_BACKGROUND}"  # two objects: stage 1, ablation
STAGE1 = "runs/synthref_rec_starter"  # the starter level (two objects): the scratch curriculum's stage 1
PRETRAIN_CONFIG = "configs/pretrain/synthref_align.yaml"  # the REC default's pre-training
PRETRAIN = "runs/pretrain_synthref"  # simvg pretrain configs/pretrain/synthref_align.yaml: the REC default's encoder
STAGE2 = "runs/synthref_rec"  # the REC default's run; the GREC default starts from its last.pth
GREC1 = "runs/synthref_grec_start"  # stage 1 of the GREC default; stage 2 (synthref_grec) starts from its last.pth
GREC_SYNTH = SYNTH.format("synthref_grec_easy", "grec", 4000, 128).replace("--seed 0", "--seed 1") + EASY
SYNTH_DATA = {  # config name -> the command that writes its dataset
    "synthref_rec": SYNTH.format("synthref_rec_easy", "rec", 4000, 128) + EASY,
    "synthref_grec": GREC_SYNTH,
    "synthref_grec_start": GREC_SYNTH,
    "synthref_std_rec": SYNTH.format("synthref_rec", "rec", 4000, 128),
    "synthref_rec_starter": SYNTH.format("synthref_rec_starter", "rec", 4000, 128).replace("--seed 0", "--seed 2")
    + STARTER,
    "synthref_smoke": SYNTH.format("synthref_smoke", "rec", 16, 64),
}


def synthref() -> dict[str, Config]:
    """Small-model recipes for a 2-core CPU (datasets from ``SYNTH_DATA``). Schedules count optimisation steps:
    REC 4000 images -> ~16000 train objects -> 500 steps of 32 per epoch; GREC -> 3200 train images -> 100 steps.
    ``synthref_rec`` / ``synthref_grec`` are the recipes of the embedded default models (simvg/assets), on the easy
    level (2-4 objects, plain background); ``synthref_std_rec`` is the same REC recipe on the standard level, where
    the scratch model stays on the "average box" plateau within this budget (docs/results.md)."""
    # One compute thread and one loader process: on a shared 2-core VM two threads per process ran 1.5-2x slower
    # than one (benchmarks/RESULTS.md). The encoder is trained from scratch here, so it gets the full rate.
    # Gradient clipping at 1.0, not the official 0.15: from random weights the gradient norm starts near 1000.
    cpu = dict(
        device="auto",
        threads=1,
        amp="bf16",
        schedule_unit="step",
        encoder_lr_scale=1.0,
        log_every_steps=100,
        lr=5e-4,
        warmup=200,
        clip_grad_norm=1.0,
        checkpoint_every_steps=250,
    )
    # No large-scale jitter: a crop can cut off the shape that made "the leftmost triangle" true.
    # Validation on val; testA (attribute) and testB (spatial) are the test splits: simvg eval --split all.
    tests = ["testA", "testB"]
    rec = DataConfig(dataset="synthref", root="data/synthref_rec_easy", image_size=128, lsj=False, num_workers=0,
                     test_splits=tests)  # fmt: skip
    grec = DataConfig(dataset="synthref", root="data/synthref_grec_easy", image_size=128, lsj=False, num_workers=0,
                      test_splits=tests)  # fmt: skip
    std = dataclasses.replace(rec, root="data/synthref_rec")
    starter = dataclasses.replace(rec, root="data/synthref_rec_starter")
    # Each SynthRef folder trains its own tokenizer; every stage after the first keeps the starter's word ids.
    starter_tokenizer = f"{starter.root}/tokenizer.spm"
    grec_tok = dataclasses.replace(grec, tokenizer=starter_tokenizer)
    smoke = DataConfig(dataset="synthref", root="data/synthref_smoke", image_size=64, num_workers=0, test_splits=tests)
    return {
        # The REC default: SimVG on the easy level from the encoder that `simvg pretrain` bound to SynthRef's words
        # (configs/pretrain/synthref_align.yaml, 2000 steps), with the starter folder's tokenizer (the word ids of
        # every SynthRef recipe). At equal compute (2400 steps) it matched the two-stage scratch curriculum (starter
        # level, then easy) on val and beat it by 15 / 12 points on testA; 5400 steps added 8-16 points to every
        # split, the token branch most (docs/results.md).
        "synthref_rec": Config(
            model=ModelSection(preset="simvg_synth_s", overrides=CONV, pretrained=f"{PRETRAIN}/beit3.pth"),
            data=dataclasses.replace(rec, tokenizer=starter_tokenizer), loss=loss((2.0, 1.0)),
            train=TrainConfig(output_dir=STAGE2, epochs=100, max_steps=5400, batch_size=32,
                              milestones=[4600], **{**cpu, "warmup": 100, "seed": 6667}),
            eval=EvalConfig(batch_size=64, max_samples=600),
        ),
        "synthref_std_rec": Config(
            model=ModelSection(preset="simvg_synth_s", overrides=CONV), data=std, loss=loss((2.0, 1.0)),
            train=TrainConfig(output_dir="runs/synthref_std_rec", epochs=100, max_steps=2000, batch_size=32,
                              milestones=[1800], **cpu),
            eval=EvalConfig(batch_size=64, max_samples=600),
        ),
        "synthref_rec_starter": Config(
            model=ModelSection(preset="simvg_synth_s", overrides=CONV), data=starter, loss=loss((2.0, 1.0)),
            train=TrainConfig(output_dir=STAGE1, epochs=100, max_steps=1200, batch_size=32,
                              milestones=[], **cpu),
            eval=EvalConfig(batch_size=64, max_samples=600),
        ),
        # The GREC default starts from the REC default's run (the words, shapes and relations are learned there):
        # 10 queries instead of 1, so the query embeddings start fresh; the REC run's tokenizer again. Stage 1 keeps
        # the official no-object weight 0.1 (a larger one from the REC start collapsed to "no target",
        # docs/results.md); stage 2 raises it to 0.25 so that the 0.7 score threshold keeps the referred boxes only:
        # weighted cross-entropy moves a query's logit by log(1 / eos_coef), and 0.1 left 0.7 too low.
        "synthref_grec_start": Config(
            model=ModelSection(preset="simvg_synth_s_grec", overrides=CONV, init_from=f"{STAGE2}/last.pth",
                               init_reset=["tqg.query_embed"]),
            data=grec_tok, loss=loss((2.0, 1.0)),
            train=TrainConfig(output_dir=GREC1, epochs=1000, max_steps=2000, batch_size=32,
                              milestones=[1700], eval_every_epochs=3, **{**cpu, "warmup": 50}),
            eval=EvalConfig(batch_size=64, max_samples=600),
        ),
        "synthref_grec": Config(
            model=ModelSection(preset="simvg_synth_s_grec", overrides=CONV, init_from=f"{GREC1}/last.pth"),
            data=grec_tok, loss=dataclasses.replace(loss((2.0, 1.0)), eos_coef=0.25),
            train=TrainConfig(output_dir="runs/synthref_grec", epochs=1000, max_steps=2500, batch_size=32,
                              milestones=[2100], eval_every_epochs=3, **{**cpu, "warmup": 50, "seed": 6667}),
            eval=EvalConfig(batch_size=64, max_samples=600),
        ),
        "synthref_smoke": Config(
            model=ModelSection(preset="simvg_tiny_test", overrides={"encoder": {"vocab_size": 1000}}),
            data=smoke, loss=loss((2.0, 1.0)),
            train=TrainConfig(output_dir="runs/synthref_smoke", device="cpu", threads=1, epochs=2, batch_size=8,
                              lr=1e-3, warmup=2, milestones=[100], schedule_unit="step", amp="none",
                              log_every_steps=1),
            eval=EvalConfig(batch_size=16),
        ),
    }  # fmt: skip


def all_configs() -> dict[str, Config]:
    recipes = vit_b_single() + vit_l_single() + mixed()
    return {**{r.name: r.config() for r in recipes}, **synthref()}


def render(name: str, cfg: Config) -> str:
    header = (
        f"# {name}: generated by configs/generate.py from the recipe table (docs/design.md O4.2); edit the\n"
        f"# script, not this file. Train: simvg train configs/{name}.yaml [--set key=value ...]\n"
    )
    if name in SYNTH_DATA:
        header += f"# Data: {SYNTH_DATA[name]}\n"
    if name == "synthref_rec":
        header += "# The REC default, from the pre-trained encoder: first simvg pretrain " + PRETRAIN_CONFIG + "\n"
    if name == "synthref_grec_start":
        header += "# Stage 1 of the GREC default, from the REC default's run: first make default-rec.\n"
    if name == "synthref_grec":
        header += "# Stage 2 of the GREC default: first simvg train configs/synthref_grec_start.yaml.\n"
    return header + dump_config(cfg)


def main(argv: list[str]) -> int:
    check = "--check" in argv
    stale = []
    for name, cfg in all_configs().items():
        assert dataclasses.is_dataclass(cfg)
        path, text = HERE / f"{name}.yaml", render(name, cfg)
        if check:
            if not path.is_file() or path.read_text() != text:
                stale.append(path.name)
        else:
            path.write_text(text)
    if stale:
        print(f"out of date (run python configs/generate.py): {', '.join(stale)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
