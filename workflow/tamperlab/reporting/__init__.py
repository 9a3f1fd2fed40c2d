"""What a finished run reports: the result tables (tables), the attack grids' figures (attack_figures), the
published numbers' names and data sets (published), and a run against a reference (compare)."""
