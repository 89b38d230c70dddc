"""Engine: the pruning engine on a torch model: layer handlers, the fx tracing of channel layouts, channel groups,
surgery (building the pruned net), importance, FLOPs counting and the knapsack. Imports `kpid_zoo.core` (and
errors/_version) and other engine modules, never the budget, training or zoo layers.
"""
