"""What every stage that trains shares: the HF Trainer's arguments, checkpoints and resume, divergence, DeepSpeed and
saving (trainer), packed batches (packing), and the supervised fine-tuning loop of the attacks and of safety tuning
(sft). Knows no model source: a stage hands the loop a loader (models/ sits above this package)."""
