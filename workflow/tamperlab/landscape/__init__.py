"""The safety landscape (Peng et al., NeurIPS 2024): directions in weight space, scans along them, VISAGE.

spec: the kinds of scan, the grid settings each uses, their number of points (pure Python: the config checks and
    the rules import it).
directions: random and interpolation directions, and moving a model along them in place.
scan: the grids (1D, 2D in snake order, interpolation), sharding, the walk itself; the subject (its prompts,
    merged weights and directions); scan CSVs; gathering the shards (checked against their manifests).
projection: attacked checkpoints' coordinates in a 2D scan's plane.
visage: the VISAGE metric (official 1D, our plateau reading and paper/mean definitions), basin width, ASR at
    the origin; the table.
figures: each scan's figure and the VISAGE step's figures.
"""
