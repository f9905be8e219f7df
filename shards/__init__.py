"""Makes data, offline, on the CPU: reads image sources, poisons them, writes WebDataset shards.

Nothing here imports ``pipeline`` or ``mcci_models``.
"""
