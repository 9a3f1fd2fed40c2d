"""Evaluations of a checkpoint: refusal (generation + judge), capability (lm-eval), and the Wilson intervals every
rate carries (stats); generation also writes a model's own answers to a split's prompts (generate_answers)."""
