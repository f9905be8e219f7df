"""Moves and transforms data and runs jobs. Floors, each importing only the ones below it:

    cli.py, train.py (entry points) -> jobs/ -> components/ -> data/ -> support/ -> shards -> mcci_models

``tests/test_layout.py`` keeps it so.
"""
