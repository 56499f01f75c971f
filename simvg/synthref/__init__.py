"""SynthRef, the synthetic grounding dataset for CPU-scale training, demos and tests: scenes of coloured shapes
(``scene``), a referring-expression language over them (``lang``, worded by ``text``), the dataset generator and its
``simvg data synth`` command (``generator``), and linked captions for encoder pre-training (``captions``)."""
