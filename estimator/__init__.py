"""The estimator: the vocabulary of RLHF plans, hardware profiles, the cost model and the simulators.

Rooms, from the floor up (each imports only the rooms before it; ``tests/test_layers.py``):
``base`` (errors, value rules, loading, io, tables), ``spec`` (models, workflows, clusters,
plans, experiments, timelines, pipeline schedule, shard math), ``profile`` (the profile format,
collective curves), ``cost`` (work and seconds of one call on one layout), ``sim`` (call
instances over time: fast evaluator, discrete-event simulator). The commands ``predict``,
``describe`` and ``calibrate`` (a forwarder to :mod:`calibration.pipeline`) and the baseline
rule (``baselines``) sit on top.
"""
