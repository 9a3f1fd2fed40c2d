"""Defences that harden a model against harmful fine-tuning before release: RepNoise, TAR."""
