"""Core: the ground every other layer stands on: files written atomically, the build lock, stage manifests and
provenance, what a folder holds and who wrote it (ownership), data fingerprints, the Hub, and the recipe schema.
Imports only `kpid_zoo.errors`, `kpid_zoo._version` and other core modules (no torch model code, no pipeline).
"""
