"""The zoo's records: one JSON file per registered timm name and tag in `kpid_zoo/zoo/`, read at import by the
registry.

A record is everything `timm.create_model(name)` needs without asking the network: the architecture (an
`ArchSpec` dict), the pretrained cfg (preprocessing, pool size, stem and head names), where the weights live on
the Hub and, when known, their sha256; plus what the zoo table shows (GMACs, params, published top-1/top-5) and
where the weights come from (the KPID authors' release, or a kpid-zoo build).

Names: a recipe's name is the zoo name it is recorded under, the folder of its card and its row in `kpid-zoo
zoo` (`kpid_effnet_b0`: the recipe, and the authors' EfficientNet-B1 pruned to B0's FLOPs). One name is one
architecture: a name's spec never changes. The tag names the weights: `<name>.json` holds a name's first
(default) weights, `<name>.<tag>.json` later weights of the same architecture; other widths need another name.
A recipe with no record is buildable, not registered.

Records are written by `python -m kpid_zoo.zoo.sources` (the KPID authors' models that timm hosts) and by
`kpid-zoo publish --record` (entries built here from a recipe). Nothing here imports the pruning engine.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from ..core.files import atomic_write_text
from ..core.names import close_names
from ..errors import MissingFileError, UserError

__all__ = [
    'ZOO_DIR',
    'RECIPES_DIR',
    'RENAMED',
    'AUTHORS',
    'KPID_BUILD',
    'ZooRecord',
    'load_records',
    'pool_size_for',
    'zoo_table',
    'find_recipe',
    'recipe_names',
    'closest_names',
    'record_for_zoo',
]

ZOO_DIR = Path(__file__).parent
# The zoo's recipes, packaged (the repository's recipes/ is a link here), so an installed kpid-zoo builds an entry
# by name: `kpid-zoo build kpid_effnet_b0`.
RECIPES_DIR = Path(__file__).parent.parent / 'recipes'
RECORD_VERSION = 1

# Names the zoo registered before its names became its recipes' (old -> new): timm still builds them, with a
# deprecation warning, as the new name with the same weights (timm's register_model_deprecations).
RENAMED = {
    'kpid_efficientnet_b1': 'kpid_effnet_b0',
    'kpid_efficientnet_b2': 'kpid_effnet_b1',
    'kpid_efficientnet_b3': 'kpid_effnet_b2',
}
# Where a record's weights come from, as `kpid-zoo zoo` and the cards say it
AUTHORS = "authors' release"
KPID_BUILD = 'kpid-zoo build'
_TAG_RE = re.compile(r'[a-z0-9_]+')
_NAME_RE = re.compile(r'kpid_[a-z0-9_]+')  # timm lists the zoo as kpid_*; a name is also a file name

# The pretrained-cfg keys a record carries (timm `PretrainedCfg` fields); the registry adds paper and hub ids.
CFG_KEYS = (
    'input_size',
    'pool_size',
    'crop_pct',
    'crop_mode',
    'interpolation',
    'mean',
    'std',
    'test_input_size',
    'test_crop_pct',
    'first_conv',
    'classifier',
    'num_classes',
    'license',
)
_REQUIRED_CFG = (
    'input_size',
    'pool_size',
    'crop_pct',
    'interpolation',
    'mean',
    'std',
    'first_conv',
    'classifier',
    'num_classes',
)


def pool_size_for(input_size: tuple[int, ...], reduction: int) -> tuple[int, int]:
    """The final feature map of an input: a stride-`reduction` CNN rounds each odd halving up (240 px / 32 -> 8)."""
    return tuple(math.ceil(int(d) / reduction) for d in input_size[-2:])


@dataclass(frozen=True)
class ZooRecord:
    name: str  # the timm model name, kpid_*
    tag: str  # the pretrained tag of these weights (timm's, for released models)
    description: str
    spec: dict  # surgery.ArchSpec.to_dict()
    source: str  # 'timm': released by the KPID authors through timm; 'kpid-zoo': built here
    source_model: str  # timm's model.tag of the released weights, or the recipe name
    hf_hub_id: str  # Hub repo of the weights
    weights_file: str  # file in that repo
    pretrained_cfg: dict  # the CFG_KEYS
    gmacs: float  # fvcore, at pretrained_cfg input_size
    params: int
    weights_sha256: str | None = None  # None: checked against the sha256 the Hub reports for the file
    top1: float | None = None  # published ImageNet-1k top-1 / top-5 (%), at eval_size
    top5: float | None = None
    eval_size: int | None = None
    metrics_source: str = ''
    version: int = RECORD_VERSION
    extra: dict = field(default_factory=dict)

    @property
    def parent(self) -> str:
        return self.spec['parent']

    @property
    def input_size(self) -> tuple[int, int, int]:
        return tuple(self.pretrained_cfg['input_size'])

    @property
    def origin(self) -> str:
        """The KPID authors' release (through timm) or a kpid-zoo build."""
        return AUTHORS if self.source == 'timm' else KPID_BUILD

    @property
    def architecture(self) -> dict:
        """What makes the network: parent, widths and the parent's build options (not the input size)."""
        return dict(
            parent=self.spec['parent'], widths=self.spec['widths'], parent_kwargs=self.spec.get('parent_kwargs') or {}
        )

    def file_name(self, default: bool = True) -> str:
        """`<name>.json` for a name's default weights, `<name>.<tag>.json` for other weights of it."""
        return f'{self.name}.json' if default else f'{self.name}.{self.tag}.json'

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict, where: str) -> ZooRecord:
        names = {f.name for f in fields(cls)}
        required = {f.name for f in fields(cls) if f.default is MISSING and f.default_factory is MISSING}
        missing, unknown = sorted(required - set(d)), sorted(set(d) - names)
        if missing or unknown:
            raise ValueError(f'{where}: not a kpid-zoo record (missing {missing}, unknown {unknown})')
        if d.get('version', RECORD_VERSION) > RECORD_VERSION:
            raise ValueError(f'{where}: record version {d["version"]} is newer than this kpid-zoo; upgrade kpid-zoo')
        lacking = [k for k in _REQUIRED_CFG if d['pretrained_cfg'].get(k) is None]
        if lacking:
            raise ValueError(f'{where}: pretrained_cfg lacks {lacking}')
        for key in ('parent', 'widths'):
            if key not in d['spec']:
                raise ValueError(f'{where}: spec lacks {key!r}')
        if not isinstance(d['name'], str) or not _NAME_RE.fullmatch(d['name']):
            raise ValueError(f'{where}: name must be kpid_ then lower-case letters, digits and _, got {d["name"]!r}')
        if not isinstance(d['tag'], str) or not _TAG_RE.fullmatch(d['tag']):
            raise ValueError(f'{where}: tag must be lower-case letters, digits and _, got {d["tag"]!r}')
        return cls(**d)

    @classmethod
    def load(cls, path: str | Path) -> ZooRecord:
        try:
            d = json.loads(Path(path).read_text(encoding='utf-8'))
        except json.JSONDecodeError as e:
            raise ValueError(f'{path}: not valid JSON ({e})') from None
        return cls.from_dict(d, str(path))

    def save(self, zoo_dir: str | Path = ZOO_DIR, default: bool = True) -> Path:
        path = Path(zoo_dir) / self.file_name(default)
        atomic_write_text(path, json.dumps(self.to_dict(), indent=2) + '\n')
        return path


def load_records(zoo_dir: str | Path = ZOO_DIR) -> list[ZooRecord]:
    """Every record in `zoo_dir`: by name, each name's default weights first, then its other tags.

    A file not named after what it holds, a name with no default file, two records of one name and tag, or
    two architectures under one name is an error naming the file.
    """
    by_name: dict[str, dict[str, tuple[Path, ZooRecord]]] = {}
    defaults: dict[str, str] = {}
    for path in sorted(Path(zoo_dir).glob('kpid_*.json')):
        record = ZooRecord.load(path)
        stem = path.name[: -len('.json')]
        if stem not in (record.name, f'{record.name}.{record.tag}'):
            raise ValueError(
                f'{path}: holds {record.name}.{record.tag}; a record file is named <name>.json '
                f'(the default weights) or <name>.<tag>.json'
            )
        tags = by_name.setdefault(record.name, {})
        if record.tag in tags:
            raise ValueError(f'{path}: {record.name}.{record.tag} is also recorded in {tags[record.tag][0]}')
        tags[record.tag] = (path, record)
        if stem == record.name:
            defaults[record.name] = record.tag
    records = []
    for name, tags in sorted(by_name.items()):
        if name not in defaults:
            raise ValueError(f'{next(iter(tags.values()))[0]}: {name} has no default record {name}.json')
        default_path, default = tags[defaults[name]]
        for path, record in tags.values():
            if record.architecture != default.architecture:
                raise ValueError(
                    f'{path}: records a different architecture than {default_path}; one name is one '
                    f'architecture (give other widths another name)'
                )
        records.append(default)
        records += [r for tag, (_, r) in sorted(tags.items()) if tag != default.tag]
    return records


def record_for_zoo(record: ZooRecord, zoo_dir: str | Path = ZOO_DIR) -> tuple[ZooRecord, bool]:
    """`record` as the zoo would hold it next to what it holds: (record with its tag, is it the default).

    A new name keeps its tag and becomes the default; weights the zoo already holds under the name keep that
    record's tag (recording them again updates it); new weights of the same widths get a new tag (`kpid_r2`, ...).
    Other widths under a recorded name are refused: a published name is one architecture forever.
    """
    if not _NAME_RE.fullmatch(record.name):
        raise ValueError(
            f'{record.name!r}: a zoo name is kpid_ then lower-case letters, digits and _ (timm lists '
            f'the zoo as kpid_*): rename the recipe'
        )
    existing = [r for r in load_records(zoo_dir) if r.name == record.name]
    if not existing:
        return record, True
    default = existing[0]
    if record.architecture != default.architecture:
        raise UserError(
            f'{record.name}: the zoo already records {record.name} ({default.origin}, '
            f'{_architecture_difference(default.architecture, record.architecture)}); one name is one '
            f'architecture: rename the recipe (its name:) and build again'
        )
    for r in existing:
        if record.weights_sha256 is not None and r.weights_sha256 == record.weights_sha256:
            return dataclasses.replace(record, tag=r.tag), r is default
    tags = {r.tag for r in existing}
    n = 2
    while f'{record.tag}_r{n}' in tags:
        n += 1
    return dataclasses.replace(record, tag=f'{record.tag}_r{n}'), False


def _architecture_difference(old: dict, new: dict) -> str:
    if old['parent'] != new['parent']:
        return f'parent {old["parent"]}, this one {new["parent"]}'
    if old['parent_kwargs'] != new['parent_kwargs']:
        return f'parent options {old["parent_kwargs"]}, this one {new["parent_kwargs"]}'
    groups = sorted(set(old['widths']) | set(new['widths']))
    differ = [g for g in groups if old['widths'].get(g) != new['widths'].get(g)]
    first = differ[0]
    return (
        f'{len(differ)} channel-group widths differ, e.g. {first}: {old["widths"].get(first, "unpruned")} '
        f'recorded, {new["widths"].get(first, "unpruned")} here'
    )


def recipe_names(recipes_dir: str | Path = RECIPES_DIR) -> list[str]:
    """The packaged recipes, by name (each is the zoo name it builds)."""
    return sorted(p.stem for p in Path(recipes_dir).glob('*.yaml'))


def _budget(recipe: Any) -> str:
    """A recipe's budget in a few words: '0.39 GMACs', '50% of the parent's GMACs', '5 ms (cpu)'..."""
    if recipe.flops is not None:
        if recipe.flops.target_gmacs is not None:
            gmacs = recipe.flops.target_gmacs
            return f'{gmacs:.2f} GMACs' if round(gmacs, 2) == gmacs else f'{gmacs:g} GMACs'
        return f"{recipe.flops.target_ratio:.0%} of the parent's GMACs"
    b = recipe.budget
    stated = (
        f'{b.latency_ms:g} ms'
        if b.latency_ms is not None
        else f"{b.latency_ratio:.0%} of the parent's latency"
        if b.latency_ratio is not None
        else f'latency of {b.latency_of}'
    )
    return f'{stated} ({b.device}, batch {b.batch_size})'


def zoo_table(
    records: list[ZooRecord] | None = None, recipes_dir: str | Path | None = RECIPES_DIR
) -> list[dict[str, Any]]:
    """One row per registered name and tag, then one per buildable recipe (a recipe with no record).

    The columns of timm's results CSVs that apply, plus where the weights come from (`weights`: the authors'
    release, a kpid-zoo build, or none yet) and their source (timm's model.tag, the Hub repo, or the recipe
    file); a buildable row has no numbers yet, but its recipe's budget and the command that builds it.
    """
    from ..core.recipe import load_recipe  # validates the recipe: a broken packaged recipe fails the table loudly

    records = records if records is not None else load_records()
    recipes = {p.stem: p for p in sorted(Path(recipes_dir).glob('*.yaml'))} if recipes_dir is not None else {}
    rows = []
    for r in records:
        rows.append(
            dict(
                model=f'{r.name}.{r.tag}',
                weights=r.origin,
                source=r.source_model if r.source == 'timm' else r.hf_hub_id,
                parent=r.parent,
                img_size=r.input_size[-1],
                gmacs=round(r.gmacs, 3),
                param_count=round(r.params / 1e6, 2),
                top1=r.top1,
                top5=r.top5,
                eval_size=r.eval_size,
                budget=None,
                build=None,
            )
        )
    recorded = {r.name for r in records}
    for name, path in recipes.items():
        if name in recorded:
            continue
        recipe = load_recipe(path)
        parent = f'{recipe.parent.model}.{recipe.parent.tag}' if recipe.parent.tag else recipe.parent.model
        rows.append(
            dict(
                model=name,
                weights='none (buildable)',
                source=f'recipes/{path.name}',
                parent=parent,
                img_size=recipe.input_size[-1],
                gmacs=None,
                param_count=None,
                top1=None,
                top5=None,
                eval_size=None,
                budget=_budget(recipe),
                build=f'kpid-zoo build {name}',
            )
        )
    return rows


def closest_names(name: str, registered: list[str] | tuple[str, ...] = (), n: int = 3) -> str:
    """' (did you mean a, b?)' for a name nobody knows, from the registered names given and the buildable
    recipes; a buildable one says how to build it, a renamed one its new name. '' when nothing is close."""
    base = name.split('.', 1)[0]
    if base in RENAMED:
        return f' ({base} is now {RENAMED[base]})'
    buildable = recipe_names()
    candidates = [*registered, *buildable, *RENAMED]
    close = close_names(base, candidates, n)
    if not close:
        return ''
    words = []
    for c in close:
        if c in RENAMED:
            c = RENAMED[c]
        if c in registered:
            words.append(c)
        else:
            words.append(f'{c} (buildable: kpid-zoo build {c})')
    return f' (did you mean {", ".join(dict.fromkeys(words))}?)'


def find_recipe(name_or_path: str | Path) -> Path:
    """A recipe file: the path itself when it exists, else the packaged recipe of that name (`kpid_effnet_b0`)."""
    path = Path(name_or_path)
    if path.exists():  # a folder or a binary is for load_recipe to refuse by name
        return path
    packaged = RECIPES_DIR / f'{path.stem}.yaml'
    if path.parent == Path('.') and packaged.is_file():
        return packaged
    hint = closest_names(path.stem, recipe_names())
    if not hint:
        hint = f' (packaged: {", ".join(recipe_names())})'
    raise MissingFileError(f'{name_or_path}: no such recipe file, nor a packaged recipe of that name{hint}')
