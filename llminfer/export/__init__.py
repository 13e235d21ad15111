"""Export to portable formats: the network as an ONNX step graph with explicit key/value inputs and outputs."""
