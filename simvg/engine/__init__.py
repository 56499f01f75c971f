"""Training and evaluation engine (free functions, no Trainer hierarchy; docs/design.md S7.2).

- ``train.fit(cfg, resume=False)``: the training loop (single process or torchrun + DDP); its loaders come from
  ``simvg.data.loaders``, its model from ``simvg.artifact``, its checkpoints from ``simvg.utils.checkpoint``.
- ``evaluate.evaluate(model, loader, device, task, branch) -> dict``: split-level REC/GREC metrics per branch.
- ``metrics``: the metric definitions as pure functions (REC Acc@0.5, gRefCOCO Pr@F1=1 / N-acc / T-acc).
- ``optim``: the official Adam parameter groups and ``MultiStepLRWarmUp``; ``ema.ModelEma``.
- ``commands`` / ``plot``: ``simvg train``, ``simvg eval``, ``simvg plot``.

Nothing is imported here, so importing one module does not pull in the others.
"""
