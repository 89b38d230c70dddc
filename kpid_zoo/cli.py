"""The `kpid-zoo` command line: count, inspect, prune, build and publish."""

from __future__ import annotations

import argparse
import contextlib
import errno
import logging
import os
import sys
from collections.abc import Callable, Iterator
from typing import NoReturn

from ._commands import (
    cmd_build,
    cmd_export_onnx,
    cmd_flops,
    cmd_groups,
    cmd_prune,
    cmd_publish,
    cmd_shards,
    cmd_zoo,
)
from .core.logs import get_logger
from .errors import UserError, one_line

logger = get_logger('kpid_zoo.cli')  # not __name__: run as `python -m kpid_zoo.cli`, that is __main__

EPILOG = """examples:
  kpid-zoo zoo                                     # the registered kpid_* models and the buildable recipes
  kpid-zoo flops resnet50                          # GMACs and params, as timm reports them
  kpid-zoo groups efficientnet_b0                  # the channel groups pruning works on
  kpid-zoo prune recipes/kpid_effnet_lite0_cifar10.yaml --out runs/lite0/pruned
  kpid-zoo build recipes/kpid_effnet_lite0_cifar10.yaml      # prune -> fine-tune -> evaluate -> export
  kpid-zoo export-onnx outputs/kpid_effnet_lite0_cifar10     # add a checked model.onnx to an older export
  kpid-zoo publish outputs/kpid_effnet_lite0_cifar10 --repo-id ORG/NAME
"""


MESSAGE_LIMIT = 1000  # characters of an error shown on the one line a command prints
INPUT_SIZE_HELP = "SIZE (C is 3), or C H W; also written C,H,W or CxHxW (default: the model's)"


@contextlib.contextmanager
def _thread_policy(args: argparse.Namespace) -> Iterator[None]:
    """Torch's intra-op threads for a long command: --threads, else OMP_NUM_THREADS, else the CPUs other processes
    leave free, re-checked as it runs (`kpid_zoo.core.threads`: on a busy machine, torch's default of one thread per
    core made a build's steps many times slower)."""
    from .core.threads import thread_policy

    with thread_policy(args.threads) as chosen:
        if not args.quiet:
            logger.info('%s: %s', args.command, chosen)
        yield


class _Parser(argparse.ArgumentParser):
    """argparse, except that a usage error is one line like every other user error (the usage is a --help away)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f'{self.prog}: error: {" ".join(message.split())} (see {self.prog} --help)\n')


def _count(minimum: int) -> Callable[[str], int]:
    """An argparse type: a whole number >= `minimum` (a process count of 0, a negative K, ...: a usage error)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value < minimum:
            raise argparse.ArgumentTypeError(f'expected a whole number >= {minimum}, got {text[:40]!r}')
        return value

    parse.__name__ = 'count'  # argparse names the type in some messages
    return parse


def _add_run_options(p: argparse.ArgumentParser) -> None:
    """The options of the commands that train or prune: progress bars and torch's thread count."""
    p.add_argument('--quiet', action='store_true', help='no progress bars')
    p.add_argument(
        '--threads',
        type=int,
        metavar='N',
        help='torch intra-op threads (default: OMP_NUM_THREADS if set, else one per core that other '
        'processes leave free, re-checked every few seconds)',
    )


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog='kpid-zoo',
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=EPILOG,
        description='Knapsack Pruning with Inner Distillation: smaller, faster timm CNNs from a recipe.',
    )
    parser.add_argument('--debug', action='store_true', help='on an error, show the full traceback instead of one line')
    loudness = parser.add_mutually_exclusive_group()
    loudness.add_argument(
        '-v', '--verbose', action='store_true', help='also write debug lines (what each stage checks, where files go)'
    )
    loudness.add_argument(
        '-q',
        '--quiet',
        dest='log_quiet',
        action='store_true',
        help="only warnings and the command's result: no progress lines, no progress bars",
    )
    sub = parser.add_subparsers(dest='command', required=True, metavar='COMMAND')

    p = sub.add_parser('flops', help='count GMACs (fvcore; 1 FLOP = 1 multiply-add) and params of a timm model')
    p.add_argument('model', help='timm model name, e.g. resnet50, or a kpid_* zoo entry')
    p.add_argument('--input-size', nargs='+', metavar='N', help=INPUT_SIZE_HELP)
    p.add_argument(
        '--per-layer',
        type=_count(0),
        nargs='?',
        const=20,
        default=0,
        metavar='K',
        help='also list the K costliest layers (default 20)',
    )
    p.set_defaults(func=cmd_flops)

    p = sub.add_parser(
        'zoo',
        help="the registered kpid_* models (weights: the authors' release or a kpid-zoo build; "
        'parent, input size, GMACs, params, top-1/5) and the recipes buildable by name',
    )
    form = p.add_mutually_exclusive_group()
    form.add_argument('--csv', action='store_true', help="CSV, in the layout of timm's results tables")
    form.add_argument('--markdown', action='store_true', help="a Markdown table (the README's)")
    p.set_defaults(func=cmd_zoo)

    p = sub.add_parser('groups', help="list the channel groups found in a timm model's graph")
    p.add_argument('model', help='timm model name')
    p.add_argument('--input-size', nargs='+', metavar='N', help=INPUT_SIZE_HELP)
    p.add_argument('--members', action='store_true', help='also list the layers in each group')
    p.set_defaults(func=cmd_groups)

    p = sub.add_parser('prune', help="prune a recipe's parent to its FLOPs target or latency budget (no fine-tune)")
    p.add_argument('recipe', help='recipe YAML or the name of a packaged one, e.g. recipes/kpid_effnet_b0.yaml')
    p.add_argument('--out', help='output folder (default runs/<name>/pruned)')
    p.add_argument('--force', action='store_true', help='prune again even if the output folder exists')
    _add_run_options(p)
    p.set_defaults(func=cmd_prune)

    p = sub.add_parser('build', help='prune -> fine-tune with inner distillation -> evaluate -> export (resumable)')
    p.add_argument('recipe', help='recipe YAML or the name of a packaged one, e.g. kpid_effnet_lite0_cifar10')
    p.add_argument('--out', help='export folder, laid out as a Hub repo (default outputs/<name>)')
    p.add_argument('--work', help='folder for stage results and checkpoints (default runs/<name>)')
    p.add_argument('--restart', action='store_true', help='discard earlier stage results instead of resuming')
    p.add_argument(
        '--dry-run',
        action='store_true',
        help="run every stage a few steps on generated stand-in data (the recipe's classes and input "
        'size) with a randomly initialised parent, then print what the real run needs (steps, '
        'checkpoints, disk); outputs go to runs/<name>-dry-run and outputs/<name>-dry-run. '
        'Launch it like the real run, e.g. accelerate launch --multi_gpu --num_processes 2 -m '
        'kpid_zoo.cli build RECIPE --dry-run (on a CPU machine too: without --multi_gpu, '
        'accelerate starts one process)',
    )
    p.add_argument(
        '--plan-processes',
        type=_count(1),
        metavar='N',
        help="with --dry-run: plan the real run for N processes (default: this launch's)",
    )
    _add_run_options(p)
    p.set_defaults(func=cmd_build)

    p = sub.add_parser('shards', help="write an ImageFolder's splits as WebDataset shards for a wds/<name> recipe")
    p.add_argument('folder', help='an ImageFolder tree: FOLDER/<split>/<class>/<image>')
    p.add_argument('out', help="output folder: <split>-NNNNNN.tar shards and _info.json (the recipe's data.root)")
    p.add_argument(
        '--splits',
        nargs='+',
        default=['train', 'val'],
        metavar='SPLIT',
        help='the splits to write (default: train val)',
    )
    p.add_argument(
        '--shard-size',
        type=int,
        default=1000,
        metavar='N',
        help='images per shard (default 1000; training needs at least processes x workers shards)',
    )
    p.add_argument('--seed', type=int, default=0, help='seed of the order images are written in (default 0)')
    p.set_defaults(func=cmd_shards)

    p = sub.add_parser('publish', help='upload an export folder to the Hugging Face Hub')
    p.add_argument('folder', help='an export folder written by `kpid-zoo build`')
    p.add_argument('--repo-id', required=True, metavar='ORG/NAME', help='the Hub model repo (created if needed)')
    p.add_argument('--private', action='store_true', help='create the repo private')
    p.add_argument('--revision', help='branch to push to (default main)')
    p.add_argument('--message', help='commit message')
    p.add_argument(
        '--record',
        action='store_true',
        help='zoo maintainers: also record the entry in kpid_zoo/zoo/ (spec + sha256), so '
        'timm.create_model(<name>) knows its architecture without asking the Hub',
    )
    p.set_defaults(func=cmd_publish)

    p = sub.add_parser(
        'export-onnx',
        help='add model.onnx (checked in ONNX Runtime) to an export folder written without one',
        description='Add model.onnx to an export folder that `kpid-zoo build` wrote before exports had one (or '
        'without the deploy extra): the network is rebuilt from the folder as a pretrained load builds it, '
        "exported with torch.onnx (opset 18, dynamic batch axis), and written only if ONNX Runtime's outputs on "
        "real images lie within the tolerance float32 rounding allows around the exact network's. config.json "
        '(kpid.onnx, kpid.files) and the model card are updated with it, the folder swapped in whole, so '
        '`publish` uploads it. A model.onnx the export did not write is never replaced. Needs the deploy '
        "extra: pip install 'kpid-zoo[deploy]'.",
    )
    p.add_argument('folder', help='an export folder written by `kpid-zoo build`')
    p.add_argument(
        '--images',
        metavar='PATH',
        help='a folder of images, or a .tar/.tar.gz of them, to check model.onnx on (the first 4, preprocessed '
        'as config.json says; default: CIFAR-10 JPEGs from $KPID_CIFAR10_TAR or ../shared/data)',
    )
    p.add_argument(
        '--force',
        action='store_true',
        help='export again even when model.onnx is up to date (exported from the current weights, unchanged)',
    )
    p.set_defaults(func=cmd_export_onnx)
    return parser


# errno values of an OSError the operating system raises about a path the user named or an environment the user
# keeps (a missing or unreadable file, a full or read-only disk): the message names the path, the user can act on it.
_USER_ERRNOS = frozenset(
    getattr(errno, name)
    for name in (
        'ENOENT',
        'EACCES',
        'EPERM',
        'EISDIR',
        'ENOTDIR',
        'EEXIST',
        'ENOTEMPTY',
        'ENAMETOOLONG',
        'ELOOP',
        'ENOSPC',
        'EROFS',
        'EDQUOT',
        'EFBIG',
        'EMLINK',
    )
    if hasattr(errno, name)
)


def _is_user_error(e: BaseException) -> bool:
    """Whether `e` is the user's to fix: one line naming what is wrong (a file, a field, a repo), exit 2.

    kpid-zoo's own `UserError`s; the Hub's answer about a repo (no such repo, no access) and a corrupt safetensors
    file, which only third-party code can raise; an OSError the operating system raised about a path (its errno says
    so: kpid-zoo's own raises about paths are UserErrors, so a bare `FileNotFoundError('...')` with no errno is a
    bug); a package that is not installed. Anything else is a bug in kpid-zoo."""
    from huggingface_hub.errors import HfHubHTTPError
    from safetensors import SafetensorError

    if isinstance(e, (UserError, HfHubHTTPError, SafetensorError)):
        return True
    if isinstance(e, OSError):
        return e.errno in _USER_ERRNOS
    if isinstance(e, ModuleNotFoundError):  # a missing optional package, not a module of kpid-zoo's own
        return bool(e.name) and e.name.split('.')[0] != 'kpid_zoo'
    return False


def _write_traceback(e: BaseException) -> str:
    """Writes `e`'s traceback to a file under the cache folder (else the temp folder); returns where it went."""
    import datetime
    import tempfile
    import traceback

    from .core.files import default_cache_dir

    text = ''.join(traceback.format_exception(e))
    name = f'internal-error-{datetime.datetime.now().strftime("%Y%m%dT%H%M%S")}-{os.getpid()}'
    try:
        logs = default_cache_dir() / 'logs'
        logs.mkdir(parents=True, exist_ok=True)
        path = logs / f'{name}.txt'
        with open(path, 'x', encoding='utf-8') as f:  # 'x': never over another file of that name
            f.write(text)
        return str(path)
    except OSError:
        try:
            fd, tmp = tempfile.mkstemp(prefix=f'kpid-zoo-{name}-', suffix='.txt')
            with os.fdopen(fd, 'w', encoding='utf-8') as f:
                f.write(text)
            return tmp
        except OSError as write_error:
            return f'nowhere: {write_error}'


class _ConsoleHandler(logging.StreamHandler):
    """Writes to `sys.stdout` (or `sys.stderr`) as it is when a line is written, not as it was when the handler was
    made: whatever replaces the stream later (pytest's capture, a redirect in a caller) gets the lines."""

    def __init__(self, name: str):
        self._stream_name = name
        super().__init__()

    @property
    def stream(self):
        return getattr(sys, self._stream_name)

    @stream.setter
    def stream(self, value) -> None:  # StreamHandler.__init__ sets it; the stream is looked up at each line
        pass


@contextlib.contextmanager
def _console_logging(args: argparse.Namespace) -> Iterator[None]:
    """The command's log lines, as bare messages: below WARNING to stdout (beside the command's result, as the
    progress of a long command), warnings and errors to stderr. Only the `kpid_zoo` logger gets the handlers, and
    only while the command runs: a library user's logging is theirs, and a second `main()` in the same process
    does not write each line twice."""
    level = logging.DEBUG if args.verbose else logging.WARNING if args.log_quiet else logging.INFO
    out, err = _ConsoleHandler('stdout'), _ConsoleHandler('stderr')
    out.addFilter(lambda record: record.levelno < logging.WARNING)
    err.setLevel(logging.WARNING)
    package = logging.getLogger('kpid_zoo')
    saved = package.level
    for handler in (out, err):
        handler.setFormatter(logging.Formatter('%(message)s'))
        package.addHandler(handler)
    package.setLevel(level)
    try:
        yield
    finally:
        for handler in (out, err):
            package.removeHandler(handler)
        package.setLevel(saved)


def main(argv: list[str] | None = None) -> int:
    import warnings

    # fvcore traces with torch.jit, which torch now flags as deprecated on every count
    warnings.filterwarnings('ignore', message='.*torch.jit.script.*is deprecated', category=FutureWarning)
    args = build_parser().parse_args(argv)
    if args.log_quiet and hasattr(args, 'quiet'):
        args.quiet = True  # -q: no progress bars either
    if not args.debug:
        # huggingface_hub logs each retry of an unreachable Hub as a warning: the error that follows says it all
        from huggingface_hub.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
    try:
        with _console_logging(args), _thread_policy(args) if hasattr(args, 'threads') else contextlib.nullcontext():
            return args.func(args)
    except BrokenPipeError:  # `kpid-zoo groups resnet50 | head`
        sys.stderr.close()
        return 0
    except KeyboardInterrupt:
        if args.debug:
            raise
        print(f'kpid-zoo {args.command}: interrupted', file=sys.stderr)
        return 130
    except Exception as e:
        if args.debug:
            raise
        from .core.hub import network_errors

        message = one_line(e, limit=MESSAGE_LIMIT)
        if isinstance(e, network_errors()):
            offline = '' if os.environ.get('HF_HUB_OFFLINE') else ' (set HF_HUB_OFFLINE=1 to use only the local cache)'
            print(
                f'kpid-zoo {args.command}: error: cannot reach the network: {message}{offline}',
                file=sys.stderr,
            )
            return 2
        if _is_user_error(e):
            print(f'kpid-zoo {args.command}: error: {message}', file=sys.stderr)
            return 2
        # a bug, not a usage problem: still one line, and where its traceback is
        print(
            f'kpid-zoo {args.command}: internal error: {type(e).__name__}: {message} '
            f'(traceback written to {_write_traceback(e)}; --debug prints it)',
            file=sys.stderr,
        )
        return 1


if __name__ == '__main__':
    sys.exit(main())
