"""The jobs a user runs, one module per ``mcci`` subcommand (train, evaluate, audit, predict,
export, preview, quickstart; experiment chains several). They import anything below them, never
``pipeline.cli``.
"""
