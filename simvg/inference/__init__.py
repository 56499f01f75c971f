"""Inference as a product: ``Grounder`` (Python API), the ``ground``/``predict`` commands, drawing and the demo."""
