"""Offline conversion steps that write files: VLM to ONNX (Optimum), ONNX Runtime fusion and quantization,
TensorRT engines, YOLO export through Ultralytics. The runtime only loads what these write."""
