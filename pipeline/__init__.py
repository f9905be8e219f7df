"""Moves and transforms data and runs jobs: config, streaming, device transforms, train, eval, CLI."""
