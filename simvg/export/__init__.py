"""``simvg export onnx``: one branch of a model as an ONNX graph for ONNX Runtime and other engines."""
