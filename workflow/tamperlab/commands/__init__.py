"""The command layer: one module per workflow/rules/*.smk, each turning its arguments into a provenance Step and
one call into the domain. Only this layer knows argparse; no command module imports another one (common.py holds
what they share). tamperlab.cli assembles the parser from each module's `register(sub)`.
"""
