"""The parts a job assembles: model and transform construction, the evaluation loop and the
reference, optimiser and schedule, checkpoints, FLOP counts. Imports ``pipeline.data``,
``pipeline.support``, ``shards`` and ``mcci_models``, never a job.
"""
