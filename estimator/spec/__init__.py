"""The vocabulary every package speaks: models, workflows (calls, version edges with their lag,
home calls), clusters and meshes, layouts and plans (with their placement helpers), experiments,
timelines, the pipeline schedule and the shard math the executor and the estimator share.

May import: ``estimator.base`` only. The executor's runtime reads the estimator through this room.
"""
