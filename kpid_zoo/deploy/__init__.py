"""Deploy: the runtimes a pruned net is deployed in (eager PyTorch, ONNX Runtime, OpenVINO) and its ONNX export.
Imports `kpid_zoo.core` (and errors/_version) and other deploy modules; torch, and the runtimes' own packages only
where a runtime is used (`pip install 'kpid-zoo[deploy]'`).
"""
