"""Datasets: fetching pinned sources, the organism's generated benign data, disjoint splits, the rows each stage
trains on, JSON-lines files, and the refusal phrases the judges and the organism share. Pure Python, the lowest
domain room: it imports nothing of tamperlab but errors."""
