"""Offline conversion steps that write files: VLM to ONNX (Optimum), ONNX Runtime fusion and quantization,
TensorRT engines, YOLO export through Ultralytics. Not yet built: see the export issue."""
