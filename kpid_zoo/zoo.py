"""The zoo's records: one JSON file per registered timm name in `kpid_zoo/zoo/`, read at import by the registry.

A record is everything `timm.create_model(name)` needs without asking the network: the architecture (an
`ArchSpec` dict), the pretrained cfg (preprocessing, pool size, stem and head names), where the weights live on
the Hub and, when known, their sha256; plus what the zoo table shows (GMACs, params, published top-1/top-5).
One name is one architecture: a name's spec never changes, new widths get a new name.

Records are written by `python -m kpid_zoo.zoo_sources` (the KPID authors' models that timm hosts) and by
`kpid-zoo publish --record` (entries built here from a recipe). Nothing here imports the pruning engine.
"""
from __future__ import annotations

import json
import math
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from .files import atomic_write_text

__all__ = ['ZOO_DIR', 'RECIPES_DIR', 'ZooRecord', 'load_record', 'load_records', 'pool_size_for', 'zoo_table',
           'find_recipe']

ZOO_DIR = Path(__file__).parent / 'zoo'
# The zoo's recipes, packaged (the repository's recipes/ is a link here), so an installed kpid-zoo builds an entry
# by name: `kpid-zoo build kpid_effnet_b0`.
RECIPES_DIR = Path(__file__).parent / 'recipes'
RECORD_VERSION = 1

# The pretrained-cfg keys a record carries (timm `PretrainedCfg` fields); the registry adds paper and hub ids.
CFG_KEYS = ('input_size', 'pool_size', 'crop_pct', 'crop_mode', 'interpolation', 'mean', 'std', 'test_input_size',
            'test_crop_pct', 'first_conv', 'classifier', 'num_classes', 'license')
_REQUIRED_CFG = ('input_size', 'pool_size', 'crop_pct', 'interpolation', 'mean', 'std', 'first_conv', 'classifier',
                 'num_classes')


def pool_size_for(input_size: tuple[int, ...], reduction: int) -> tuple[int, int]:
    """The final feature map of an input: a stride-`reduction` CNN rounds each odd halving up (240 px / 32 -> 8)."""
    return tuple(math.ceil(int(d) / reduction) for d in input_size[-2:])


@dataclass(frozen=True)
class ZooRecord:
    name: str                       # the timm model name, kpid_*
    tag: str                        # the pretrained tag of these weights (timm's, for released models)
    description: str
    spec: dict                      # surgery.ArchSpec.to_dict()
    source: str                     # 'timm': released by the KPID authors through timm; 'kpid-zoo': built here
    source_model: str               # timm's model.tag of the released weights, or the recipe name
    hf_hub_id: str                  # Hub repo of the weights
    weights_file: str               # file in that repo
    pretrained_cfg: dict            # the CFG_KEYS
    gmacs: float                    # fvcore, at pretrained_cfg input_size
    params: int
    weights_sha256: str | None = None  # None: checked against the sha256 the Hub reports for the file
    top1: float | None = None       # published ImageNet-1k top-1 / top-5 (%), at eval_size
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
            raise ValueError(f"{where}: record version {d['version']} is newer than this kpid-zoo; upgrade kpid-zoo")
        lacking = [k for k in _REQUIRED_CFG if d['pretrained_cfg'].get(k) is None]
        if lacking:
            raise ValueError(f'{where}: pretrained_cfg lacks {lacking}')
        for key in ('parent', 'widths'):
            if key not in d['spec']:
                raise ValueError(f'{where}: spec lacks {key!r}')
        return cls(**d)

    @classmethod
    def load(cls, path: str | Path) -> ZooRecord:
        try:
            d = json.loads(Path(path).read_text(encoding='utf-8'))
        except json.JSONDecodeError as e:
            raise ValueError(f'{path}: not valid JSON ({e})') from None
        return cls.from_dict(d, str(path))

    def save(self, zoo_dir: str | Path = ZOO_DIR) -> Path:
        path = Path(zoo_dir) / f'{self.name}.json'
        atomic_write_text(path, json.dumps(self.to_dict(), indent=2) + '\n')
        return path


def load_records(zoo_dir: str | Path = ZOO_DIR) -> list[ZooRecord]:
    """Every record in `zoo_dir`, by name; a record whose file name is not its name is an error."""
    records = []
    for path in sorted(Path(zoo_dir).glob('kpid_*.json')):
        record = ZooRecord.load(path)
        if record.name != path.stem:
            raise ValueError(f'{path}: holds {record.name!r}; a record file is named after its model')
        records.append(record)
    return records


def load_record(name: str, zoo_dir: str | Path = ZOO_DIR) -> ZooRecord | None:
    path = Path(zoo_dir) / f'{name}.json'
    return ZooRecord.load(path) if path.is_file() else None


def zoo_table(records: list[ZooRecord] | None = None) -> list[dict[str, Any]]:
    """One row per entry, the columns of timm's results CSVs that apply (plus source and parent)."""
    rows = []
    for r in records if records is not None else load_records():
        rows.append(dict(
            model=f'{r.name}.{r.tag}', source=r.source_model if r.source == 'timm' else r.source,
            parent=r.parent, img_size=r.input_size[-1], gmacs=round(r.gmacs, 3), param_count=round(r.params / 1e6, 2),
            top1=r.top1, top5=r.top5, eval_size=r.eval_size,
        ))
    return rows


def find_recipe(name_or_path: str | Path) -> Path:
    """A recipe file: the path itself when it exists, else the packaged recipe of that name (`kpid_effnet_b0`)."""
    path = Path(name_or_path)
    if path.exists():  # a folder or a binary is for load_recipe to refuse by name
        return path
    packaged = RECIPES_DIR / f'{path.stem}.yaml'
    if path.parent == Path('.') and packaged.is_file():
        return packaged
    names = ', '.join(sorted(p.stem for p in RECIPES_DIR.glob('*.yaml')))
    raise FileNotFoundError(f'{name_or_path}: no such recipe file, nor a packaged recipe of that name ({names})')
