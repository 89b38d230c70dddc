"""Under torchrun (CPU, gloo): the ranks of one launch enter `build_lock(folder)` together, and when another live
process holds the folder's lock they are all refused (none waits at a barrier for the others).

Each rank writes one line per attempt, `inside` or `refused: <message>`, to <out>/rank<N>.txt (a file per rank:
lines two processes print to one pipe can interleave); the second attempt finds a lock naming torchrun's own pid.
"""

import json
import os
import socket
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from kpid_zoo.core.lock import LOCK_FILE, LockedError, build_lock  # noqa: E402
from kpid_zoo.training.accelerator import process_accelerator  # noqa: E402

folder, out = Path(sys.argv[1]), Path(sys.argv[2])
state = process_accelerator()  # on CPU, the one that sets up the gloo group
outcomes = []
for attempt in range(2):
    try:
        with build_lock(state, folder):
            state.wait_for_everyone()
            outcomes.append('inside')
    except LockedError as e:
        outcomes.append(f'refused: {e}')
    state.wait_for_everyone()
    if attempt == 0 and state.is_main_process:
        (folder / LOCK_FILE).write_text(
            json.dumps({'pid': os.getppid(), 'host': socket.gethostname(), 'started': '2026-01-01T00:00:00+00:00'})
        )
    state.wait_for_everyone()
(out / f'rank{state.process_index}.txt').write_text('\n'.join(outcomes) + '\n')
