"""The data path: shard folders or URLs -> manifests -> streamed batches -> device-ready, augmented
inputs and their spectra. Imports ``pipeline.support`` only (and the libraries it wraps).
"""
