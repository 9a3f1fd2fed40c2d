"""How a step runs and what it leaves behind, whatever the step: CPU numerics pinned before torch loads (numerics),
threads fitted to idle cores (cpu), log lines (logs), single- or multi-process launch (launch), the manifest of every
output (provenance) and a step run again from its manifest (replay). Imports nothing of the domain."""
