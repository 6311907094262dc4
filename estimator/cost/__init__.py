"""Work and seconds of one call on one layout: the op census and its pieces, decoding on a
pipeline, memory per device, reallocation and data transfers over links, lowering a call into
per-stage task costs, the roofline bound.

May import: ``estimator.base``, ``estimator.spec`` and ``estimator.profile``.
"""
