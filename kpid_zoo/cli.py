"""The `kpid-zoo` command line: count, inspect, prune, build and publish."""

from __future__ import annotations

import argparse
import contextlib
import errno
import logging
import os
import re
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import NoReturn, TypeVar

from .core.logs import get_logger
from .errors import KpidError, UserError

T = TypeVar('T')
logger = get_logger('kpid_zoo.cli')  # not __name__: run as `python -m kpid_zoo.cli`, that is __main__

EPILOG = """examples:
  kpid-zoo zoo                                     # the registered kpid_* models and the buildable recipes
  kpid-zoo flops resnet50                          # GMACs and params, as timm reports them
  kpid-zoo groups efficientnet_b0                  # the channel groups pruning works on
  kpid-zoo prune recipes/kpid_effnet_lite0_cifar10.yaml --out runs/lite0/pruned
  kpid-zoo build recipes/kpid_effnet_lite0_cifar10.yaml      # prune -> fine-tune -> evaluate -> export
  kpid-zoo publish outputs/kpid_effnet_lite0_cifar10 --repo-id ORG/NAME
"""


INPUT_SIZE_HELP = "SIZE (C is 3), or C H W; also written C,H,W or CxHxW (default: the model's)"


def parse_input_size(values: list[str]) -> tuple[int, int, int]:
    """--input-size as (C, H, W): SIZE, or C H W (one argument each, or one argument "C,H,W" / "CxHxW").

    Checked before any model is made: a side of 0 or a negative one, or one a trace could not hold in memory
    (100000 px is 120 GB of input alone), is a usage error, not an exception from deep inside a forward pass."""
    from .core.recipe import MAX_SIDE

    text = ' '.join(values).strip()
    shown = text if len(text) <= 40 else text[:37] + '...'
    expected = 'SIZE or C H W in whole numbers, e.g. 224 or 3 224 224'
    try:
        numbers = [int(part) for part in re.split(r'[\s,x]+', text)]
    except ValueError:
        raise UserError(f'--input-size: expected {expected}, got {shown!r}') from None
    if len(numbers) not in (1, 3):
        raise UserError(f'--input-size: expected {expected}, got {len(numbers)} numbers ({shown!r})')
    channels, height, width = (3, numbers[0], numbers[0]) if len(numbers) == 1 else numbers
    if channels < 1:
        raise UserError(f'--input-size: expected a positive channel count C, got {channels}')
    for side in (height, width):
        if not 1 <= side <= MAX_SIDE:
            raise UserError(f'--input-size: expected H and W from 1 to {MAX_SIDE} px, got {side}')
    return channels, height, width


def cmd_flops(args: argparse.Namespace) -> int:
    from .engine.flops import count_flops, count_params

    model, size = _model_and_size(args)
    report = _at_size(args, model, size, lambda: count_flops(model, size))
    print(
        f'{args.model} at {"x".join(map(str, size))}: {report.gmacs:.4f} GMACs, {count_params(model) / 1e6:.3f}M params'
    )
    if args.per_layer:
        leaves = {n for n, m in model.named_modules() if next(m.children(), None) is None}
        rows = sorted(((c, n) for n, c in report.by_module.items() if n in leaves and c), reverse=True)
        for count, name in rows[: args.per_layer]:
            print(f'  {count / 1e6:10.2f} MMACs  {100 * count / report.total:5.1f}%  {name}')
    return 0


def cmd_groups(args: argparse.Namespace) -> int:
    from .engine.groups import discover_groups

    model, size = _model_and_size(args)
    graph = _at_size(args, model, size, lambda: discover_groups(model, size))
    print(f'{args.model}: {len(graph.groups)} channel groups, {len(graph.prunable)} prunable')
    for g in graph.groups:
        status = f'  [fixed: {g.reason}]' if not g.prunable else f'  [inexact: {g.inexact}]' if g.inexact else ''
        print(f'  {g.name:<40} {g.size:>5} ch  {len(g.members):>3} members{status}')
        if args.members:
            for m in g.members:
                print(f'      {m.role:<4} {m.module}')
    return 0


def cmd_shards(args: argparse.Namespace) -> int:
    from tqdm.auto import tqdm

    from .training.data import folder_samples
    from .training.shards import write_shards

    for split in args.splits:
        samples, classes = folder_samples(Path(args.folder) / split)
        written = write_shards(
            samples,
            args.out,
            split,
            args.shard_size,
            class_names=classes,
            seed=args.seed,
            progress=lambda chunks, s=split: tqdm(chunks, desc=f'shards ({s})', leave=False),
        )
        print(f'{split}: {len(samples)} images in {len(written)} shards -> {args.out}')
    return 0


def cmd_prune(args: argparse.Namespace) -> int:
    from .budget.report import summary_table
    from .build import PRUNE_ENTRIES, adapt_parent, guard_prune_paths, load_or_prune, preflight, prepare_work
    from .core.lock import build_lock
    from .core.provenance import MANIFEST_DIR
    from .core.recipe import load_recipe
    from .training.accelerator import process_accelerator
    from .training.data import create_loaders
    from .training.parent import create_parent
    from .zoo.records import find_recipe

    recipe = load_recipe(find_recipe(args.recipe))
    # before any slow work: --out holds nothing but a previous pruning, its parent folder nothing of ours unrecorded
    paths = guard_prune_paths(args.out or Path('runs') / recipe.name / 'pruned')
    out = paths.pruned
    accelerator = process_accelerator()
    with build_lock(accelerator, paths.work):  # first: a locked folder is refused before the checks trace the parent
        preflight(recipe)
        guard_prune_paths(out)  # again, now that no other build can write there
        prepare_work(accelerator, paths.work, PRUNE_ENTRIES + (out.name,), vetted=(out.name,))
        if args.force:
            (paths.work / MANIFEST_DIR / 'pruned.json').unlink(missing_ok=True)
        elif out.exists():
            logger.warning('%s exists: showing it if it is up to date (pass --force to prune again)', out)
        parent = create_parent(recipe)
        needs_data = recipe.importance.method == 'taylor' or recipe.parent.train.epochs > 0
        data = (
            create_loaders(
                recipe.data,
                model=parent,
                input_size=recipe.input_size,
                seed=recipe.finetune.seed,
                progress=not args.quiet,
            )
            if needs_data
            else None
        )
        parent, parent_ref = adapt_parent(accelerator, recipe, parent, data, paths.work, progress=not args.quiet)
        result, _ = load_or_prune(accelerator, recipe, parent, data, paths, parent_ref, progress=not args.quiet)
    print(summary_table(result))
    print(f'wrote {out}/ (model.safetensors, spec.json, report.json, widths.png)')
    return 0


def cmd_build(args: argparse.Namespace) -> int:
    from .zoo.records import find_recipe

    args.recipe = find_recipe(args.recipe)  # a file, or a packaged recipe's name
    if args.dry_run:
        from .dry_run import dry_run
        from .training.accelerator import process_accelerator

        plan = dry_run(
            args.recipe, out_dir=args.out, work_dir=args.work, processes=args.plan_processes, progress=not args.quiet
        )
        state = process_accelerator()
        if state.is_main_process:
            # the process count says whether the launch really was distributed (`accelerate launch
            # --num_processes 2` without --multi_gpu starts one process on a machine without GPUs)
            print(
                f'dry run passed: every stage of {args.recipe} ran on stand-in data in '
                f'{state.num_processes} process{"es" if state.num_processes > 1 else ""}'
            )
            print(plan.table())
        return 0
    from .build import build

    result = build(args.recipe, out_dir=args.out, work_dir=args.work, resume=not args.restart, progress=not args.quiet)
    m = result.metrics
    print(
        f'top-1 {m["top1"]:.2f}% (parent {m["parent_top1"]:.2f}%), top-5 {m["top5"]:.2f}% on '
        f'{m["dataset"]} {m["split"]}'
    )
    print(
        f'wrote {result.export_dir}/ (model.safetensors, config.json, README.md): '
        f'publish it with `kpid-zoo publish {result.export_dir} --repo-id {result.recipe.hub.repo_id}`'
    )
    return 0


def cmd_publish(args: argparse.Namespace) -> int:
    from .zoo import records as zoo
    from .zoo.publish import publish

    if args.record:  # a name the zoo holds with other widths is refused before anything is uploaded
        from .zoo.export import zoo_entry_from_export

        zoo.record_for_zoo(zoo_entry_from_export(args.folder, revision=args.revision), zoo.ZOO_DIR)
    url = publish(args.folder, args.repo_id, private=args.private, revision=args.revision, commit_message=args.message)
    print(f'published {args.folder} to {url}')
    if args.record:
        from .zoo.export import write_zoo_entry

        path = write_zoo_entry(args.folder, zoo_dir=zoo.ZOO_DIR, revision=args.revision)
        record = zoo.ZooRecord.load(path)
        print(f'recorded {record.name}.{record.tag} in {path}')
    return 0


def cmd_zoo(args: argparse.Namespace) -> int:
    import csv

    from .zoo.records import zoo_table

    rows = zoo_table()
    columns = list(rows[0]) if rows else []
    if args.csv:  # the layout of timm's results CSVs
        writer = csv.DictWriter(sys.stdout, columns, lineterminator='\n')
        writer.writeheader()
        writer.writerows(rows)
        return 0
    cells = [columns] + [['' if r[c] is None else str(r[c]) for c in columns] for r in rows]
    if args.markdown:  # the README's table
        for i, row in enumerate(cells):
            print('| ' + ' | '.join(row) + ' |')
            if i == 0:
                print('|' + '---|' * len(columns))
        return 0
    widths = [max(len(row[i]) for row in cells) for i in range(len(columns))]
    for row in cells:
        print('  '.join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip())
    return 0


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


def _model_and_size(args: argparse.Namespace):
    """The timm model named on the command line, and --input-size (checked first) or else the model's own."""
    size = parse_input_size(args.input_size) if args.input_size else None
    model = _create(args.model)
    if size is None:
        return model, tuple(model.pretrained_cfg.get('input_size', (3, 224, 224)))
    channels = _input_channels(model)
    if channels is not None and size[0] != channels:
        raise UserError(f'--input-size: {args.model} takes {channels}-channel images, got C = {size[0]}')
    return model, size


def _input_channels(model) -> int | None:
    """The channels the model's stem convolution takes (timm's pretrained cfg names it), None if unknown."""
    from torch import nn

    name = (getattr(model, 'pretrained_cfg', None) or {}).get('first_conv')
    names = [name] if isinstance(name, str) else list(name or [])
    for n in names:
        try:
            stem = model.get_submodule(n)
        except AttributeError:
            continue
        if isinstance(stem, nn.Conv2d):
            return stem.in_channels
    return None


def _at_size(args: argparse.Namespace, model, size: tuple[int, int, int], count: Callable[[], T]) -> T:
    """`count()`, the trace of `model` on one image of `size`; when that fails at a size the user chose and the
    model does not even run a plain forward pass there (a 7x7 stem on a 2 px image, a ViT's fixed patch grid),
    the size is what is wrong: one line saying so, not the tracer's traceback."""
    import torch

    try:
        return count()
    except Exception as e:
        if not args.input_size:
            raise
        try:
            with torch.no_grad():
                model(torch.zeros(1, *size))
        except Exception as forward_error:  # any kind: a user-chosen size made the model's own forward fail
            reason = ' '.join(str(forward_error).split()) or type(forward_error).__name__
            raise UserError(
                f'--input-size: {args.model} does not run on a {"x".join(map(str, size))} image: {reason[:300]}'
            ) from e
        raise


def _create(name: str):
    import timm

    import kpid_zoo  # noqa: F401  (registers kpid_* names)

    from .zoo.records import closest_names, recipe_names

    if not timm.is_model(name) and not name.startswith(('hf-hub:', 'local-dir:')):
        if name in recipe_names():
            raise UserError(
                f'{name} is a recipe whose network has not been built, so it has no registered name '
                f'yet: `kpid-zoo build {name}` builds it (`kpid-zoo prune {name}` prunes it alone)'
            )
        raise UserError(f'{name!r} is not a timm model nor a kpid-zoo name{closest_names(name, timm.list_models())}')
    if name.startswith('hf-hub:'):  # timm fetches its config.json: in seconds, or one line, when the Hub is away
        from timm.models._hub import hf_split

        from .core.hub import require_hub_or_cache

        repo_id, revision = hf_split(name[len('hf-hub:') :])
        require_hub_or_cache(repo_id, ('config.json',), revision=revision)
    try:
        return timm.create_model(name).eval()
    except (KpidError, OSError):  # kpid-zoo's own, the Hub away or a user's file: main's one line, exit 2
        raise
    except (ValueError, RuntimeError) as e:  # timm's about the name: an unknown pretrained tag, a bad config.json
        raise UserError(f'{name}: {e}') from None


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
    p.add_argument('--quiet', action='store_true', help='no progress bars')
    p.add_argument(
        '--threads',
        type=int,
        metavar='N',
        help='torch intra-op threads (default: OMP_NUM_THREADS if set, else one per core that other '
        'processes leave free, re-checked every few seconds)',
    )
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
    p.add_argument('--quiet', action='store_true', help='no progress bars')
    p.add_argument(
        '--threads',
        type=int,
        metavar='N',
        help='torch intra-op threads (default: OMP_NUM_THREADS if set, else one per core that other '
        'processes leave free, re-checked every few seconds)',
    )
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


def _one_line(e: BaseException) -> str:
    text = ' '.join(str(e).split()) or type(e).__name__
    return text if len(text) <= 1000 else text[:997] + '...'


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

        if isinstance(e, network_errors()):
            offline = '' if os.environ.get('HF_HUB_OFFLINE') else ' (set HF_HUB_OFFLINE=1 to use only the local cache)'
            print(f'kpid-zoo {args.command}: error: cannot reach the network: {_one_line(e)}{offline}', file=sys.stderr)
            return 2
        if _is_user_error(e):
            print(f'kpid-zoo {args.command}: error: {_one_line(e)}', file=sys.stderr)
            return 2
        # a bug, not a usage problem: still one line, and where its traceback is
        print(
            f'kpid-zoo {args.command}: internal error: {type(e).__name__}: {_one_line(e)} '
            f'(traceback written to {_write_traceback(e)}; --debug prints it)',
            file=sys.stderr,
        )
        return 1


if __name__ == '__main__':
    sys.exit(main())
