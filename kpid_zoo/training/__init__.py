"""Training: the parent network, the data (image folders, datasets, streamed shards), inner distillation, the
fine-tuning loop, evaluation and the process's Accelerator. Imports `kpid_zoo.core`, `kpid_zoo.engine` and
`kpid_zoo.budget` (and errors/_version) and other training modules, never the zoo layer or the top-level build/cli.
"""
