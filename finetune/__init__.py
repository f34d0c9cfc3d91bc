"""Visual instruction data from YOLO-format detection datasets and LoRA tuning of the VLM.
Not yet built: see the fine-tuning issue."""
