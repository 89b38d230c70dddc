"""What each `kpid-zoo` command does (`cmd_<command>`, given its parsed arguments) and the checks of the model and
input size they share. The parser, the logging and the exit codes are `kpid_zoo.cli`'s.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from .core.logs import get_logger
from .errors import KpidError, UserError, one_line

T = TypeVar('T')
logger = get_logger('kpid_zoo.cli')  # the command line's lines under one name, as before the commands had a module


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
        print(f'  {g.name:<40} {g.size:>5} {g.unit}  {len(g.members):>3} members{status}')
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
    from ._stages import adapt_parent, load_or_prune
    from ._workdir import PRUNE_ENTRIES, guard_prune_paths, prepare_work
    from .budget.report import summary_table
    from .build import preflight
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
        preflight(recipe, fine_tunes=False)  # prune only: no distillation points needed
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
    onnx = ', model.onnx' if (Path(result.export_dir) / 'model.onnx').is_file() else ''  # else the log said why
    print(
        f'wrote {result.export_dir}/ (model.safetensors, config.json{onnx}, README.md): '
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


def cmd_export_onnx(args: argparse.Namespace) -> int:
    from .zoo.export_onnx import add_onnx

    _, message = add_onnx(args.folder, images=args.images, force=args.force)
    print(message)
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
            reason = one_line(forward_error)
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
