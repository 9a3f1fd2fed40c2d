"""The safety landscape (Peng et al., NeurIPS 2024): directions in weight space, scans along them, VISAGE.

directions: random and interpolation directions, and moving a model along them in place.
scan: the grids (1D, 2D in snake order, interpolation), sharding, the walk itself, gathering the shards.
visage: the VISAGE metric (official 1D and paper/mean definitions), basin width, ASR at the origin.
"""
