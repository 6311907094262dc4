"""The floor: errors and exit codes, value rules, the one loading path for YAML/JSON files,
atomic output files, plain-text tables — nothing about RLHF.

May import: nothing of the project (the standard library, numpy, yaml).
"""
