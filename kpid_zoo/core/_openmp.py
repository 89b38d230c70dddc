"""How torch's OpenMP threads wait, chosen for the command line before torch (libgomp) is loaded.

libgomp reads OMP_WAIT_POLICY / GOMP_SPINCOUNT once, when it is loaded (`import torch`), so this module imports
nothing heavy and runs from `kpid_zoo/__init__.py` before anything imports torch. By default an idle OpenMP thread
spins for about 3 ms before it sleeps: on a machine whose cores are busy with other work (an editor, a browser, a
second job) the spinning thread holds a core that its teammate, the loader worker or the other work needs, and a
2-thread training step of the main job became many times slower than a 1-thread one. PASSIVE makes it sleep at
once (benchmarks/busy_machine.py measures both).

Only the `kpid-zoo` entry points change it (the console script, `python -m kpid_zoo.<module>`, and the processes
`accelerate launch -m kpid_zoo.cli` starts): a program that imports kpid_zoo as a library keeps its own settings.
A setting already in the environment (OMP_WAIT_POLICY or GOMP_SPINCOUNT) wins.
"""

from __future__ import annotations

import os
import sys

WAIT_ENV = {'OMP_WAIT_POLICY': 'PASSIVE'}


def entry_is_cli(argv: list[str] | None = None, orig_argv: list[str] | None = None) -> bool:
    """Whether this process was started as a kpid-zoo command (not a program importing the package)."""
    argv = sys.argv if argv is None else argv
    orig_argv = getattr(sys, 'orig_argv', []) if orig_argv is None else orig_argv
    if argv and os.path.basename(argv[0]) in ('kpid-zoo', 'kpid-zoo.exe'):
        return True
    for i, arg in enumerate(orig_argv[1:-1], start=1):
        if arg == '-m':
            return orig_argv[i + 1].split('.')[0] == 'kpid_zoo'
        if not arg.startswith('-'):  # the script: `python some_script.py ...`
            return False
    return False


def choose_wait_policy() -> dict[str, str]:
    """Set OMP_WAIT_POLICY=PASSIVE in this process's environment for a kpid-zoo command whose torch is not loaded
    yet, unless the environment already says how OpenMP threads wait; returns what it set."""
    if 'torch' in sys.modules or not entry_is_cli():
        return {}
    if any(os.environ.get(k) for k in ('OMP_WAIT_POLICY', 'GOMP_SPINCOUNT')):
        return {}
    os.environ.update(WAIT_ENV)
    return dict(WAIT_ENV)


def describe_wait() -> str:
    """How idle OpenMP threads wait in this process, in words (what libgomp read when torch loaded, as long as
    nothing changed the environment since)."""
    for key in ('GOMP_SPINCOUNT', 'OMP_WAIT_POLICY'):  # libgomp: GOMP_SPINCOUNT wins over the policy
        if os.environ.get(key):
            return f'{key}={os.environ[key]}'
    return "OpenMP's default wait (spin about 3 ms)"
