"""Budget: turning a recipe's budget (a FLOPs target or a latency budget timed on the device) into a pruned net:
the prune step, the latency lookup table and the prune report. Imports `kpid_zoo.core` and `kpid_zoo.engine` (and
errors/_version) and other budget modules, never the training or zoo layers.
"""
