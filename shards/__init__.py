"""Makes data, offline, on the CPU: reads image sources, poisons them, writes WebDataset shards.

Imports ``mcci_models`` at most (to read a trained model for the attacks that optimise against one),
never ``pipeline``.
"""
