"""Visual instruction tuning from detection datasets.

The shapes world (synthetic YOLO data with exact attributes), YOLO dataset reading, instruction data written
by a teacher from the labels (LLaVA's conversation / detailed description / complex reasoning), LoRA training
in two stages with peft, adapter merge, and the held-out shapes benchmark run through the real runtime.
Not here yet: the trained demo models that `edge-vit demo` will ship (see the fine-tuning issue).
"""
