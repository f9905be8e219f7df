"""Support, the floor every other part of ``pipeline`` stands on: configuration, user errors,
metrics as pure functions, atomic reports and figures. Imports nothing from ``pipeline`` above it.
"""
