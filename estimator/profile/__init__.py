"""Hardware profiles: the profile file format and its lookups (compute curves, host costs, the
executor's fixed costs, host sharing) and the collective time curves over message and group size.

May import: ``estimator.base`` and ``estimator.spec``.
"""
