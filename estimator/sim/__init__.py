"""Call instances over time: the unrolled instance graph, host sharing (the blend and its fixed
point), the fast evaluator the search screens with, the simpy discrete-event simulator, and
``simulate``, the entry that runs the simulator with the host weights.

May import: ``estimator.base``, ``spec``, ``profile`` and ``cost``.
"""
