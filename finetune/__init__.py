"""Visual instruction tuning from detection datasets: the shapes world, YOLO dataset reading, instruction data
(LLaVA's conversation / detailed description / complex reasoning) written by a teacher from the labels.
Training, evaluation and the shipped demo models come next (see the fine-tuning issue)."""
