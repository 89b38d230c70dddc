"""The model card (README.md) of an exported kpid-zoo model, and its per-layer width plot.

The card is a `huggingface_hub.ModelCard`: YAML metadata the Hub indexes (library_name: timm, license, tags,
base_model, a model-index with the top-1/top-5 results), then a body a person reads (how to load it, FLOPs,
params, parent, the recipe verbatim with its sha256, and the width plot).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import yaml
from huggingface_hub import EvalResult, ModelCard, ModelCardData

from ..core.files import WEIGHTS_FILE

PAPER_ID = 'arXiv:2002.08258'
PAPER_NAME = 'Knapsack Pruning with Inner Distillation'
PAPER_URL = 'https://arxiv.org/abs/2002.08258'
WIDTHS_PLOT = 'layer_widths.png'
CITATION = """## Citation

```bibtex
@article{aflalo2020knapsack,
  title={Knapsack Pruning with Inner Distillation},
  author={Aflalo, Yonathan and Noy, Asaf and Lin, Ming and Friedman, Itamar and Zelnik, Lihi},
  journal={arXiv preprint arXiv:2002.08258},
  year={2020}
}
```
"""

# Hub dataset ids (for `datasets:` and the model-index), keyed by recipe `data.dataset`.
_DATASETS = {
    'imagefolder': ('imagenet-1k', 'ImageNet-1k'),
    'cifar10': ('cifar10', 'CIFAR-10'),
}


def _latency_rows(latency) -> list[tuple[str, str]]:
    """The latency budget's outcome, as measured where the build ran (a dict once read back from report.json)."""
    if latency is None:
        return []
    get = latency.get if isinstance(latency, dict) else lambda k: getattr(latency, k)
    return [
        (
            'Latency (measured / budget / parent)',
            f'{get("measured_ms"):.3f} / {get("budget_ms"):.3f} / {get("parent_ms"):.3f} ms on {get("device")}, '
            f'batch {get("batch_size")}, {get("threads")} threads ({get("device_name")}), each timed beside '
            f'{"the parent" if (get("reference") or "parent") == "parent" else get("reference")}',
        )
    ]


def _finetune(metrics: Mapping[str, Any], recipe_dict: Mapping[str, Any]) -> tuple[str, list[tuple[str, str]]]:
    """The card's sentence and table row on what ran after pruning, from the build's `finetune_steps` and
    `finetune_epochs` (an export made outside a build records neither, and the card claims nothing)."""
    steps, epochs = metrics.get('finetune_steps'), metrics.get('finetune_epochs')
    if not isinstance(steps, int) or isinstance(steps, bool) or not isinstance(epochs, (int, float)):
        return 'How it was trained after pruning is not recorded.', []
    if steps == 0:
        return (
            "It is **not fine-tuned** (`finetune.epochs: 0`): its weights are the parent's, for the channels "
            "kept, and its accuracy below is the pruned network's as it came out of pruning.",
            [('Fine-tune', 'none: not fine-tuned (`finetune.epochs: 0`)')],
        )
    spec = recipe_dict.get('finetune') or {}
    features, logits = (spec.get('kd_gamma') or 0) > 0, (spec.get('kd_logits_weight') or 0) > 0
    how = (
        'inner distillation from its parent' + (' (features and logits)' if logits else '')
        if features
        else 'logit distillation from its parent'
        if logits
        else 'cross-entropy alone (no distillation)'
    )
    ran = f'{steps} optimizer steps ({epochs:.3g} epoch{"s" if epochs != 1 else ""})'
    return f'It was then fine-tuned for {ran} with {how}.', [('Fine-tune', f'{ran}, {how}')]


def _pct(v: Any) -> str:
    return f'{float(v):.2f}' if isinstance(v, (int, float)) else str(v)


def build_card(
    *,
    name: str,
    repo_id: str,
    spec_parent: str,
    base_model: str | None,
    license: str,
    dataset: str,
    metrics: Mapping[str, Any],
    report: Any,
    recipe_dict: Mapping[str, Any],
    recipe_sha256: str,
    weights_sha256: str,
    pretrained_cfg: Mapping[str, Any],
    onnx: Mapping[str, Any] | None = None,
) -> ModelCard:
    """The card for one export; `metrics` holds top1/top5 in percent (as `evaluate.EvalResult`); `onnx` is the
    export's `kpid.onnx` record: the card tells how to run model.onnx only when there is one."""
    dataset_id, dataset_name = _DATASETS.get(dataset, (dataset, dataset))
    eval_results = [
        EvalResult(
            task_type='image-classification',
            task_name='Image Classification',
            dataset_type=dataset_id,
            dataset_name=dataset_name,
            dataset_split=str(metrics.get('split', 'validation')),
            metric_type='accuracy',
            metric_name=f'Top-{k} Accuracy',
            metric_value=round(float(metrics[f'top{k}']), 3),
        )
        for k in (1, 5)
        if metrics.get(f'top{k}') is not None
    ]
    data = ModelCardData(
        library_name='timm',
        pipeline_tag='image-classification',
        license=license,
        tags=['image-classification', 'timm', 'pruning', 'kpid', 'knapsack-pruning', 'distillation'],
        datasets=[dataset_id],
        base_model=base_model,
        model_name=name,
        eval_results=eval_results or None,
        metrics=['accuracy'],
    )
    gmacs = getattr(report, 'achieved_gmacs', None)
    finetuned, finetune_rows = _finetune(metrics, recipe_dict)
    rows = [
        (
            'Parent',
            f'`{spec_parent}`' + (f' ([{base_model}](https://huggingface.co/{base_model}))' if base_model else ''),
        ),
        ('GMACs (pruned / parent)', f'{gmacs:.3f} / {report.parent_gmacs:.3f} (target {report.target_gmacs:.3f})'),
        ('Params (pruned / parent)', f'{report.params / 1e6:.2f} M / {report.parent_params / 1e6:.2f} M'),
        *_latency_rows(getattr(report, 'latency', None)),
        ('Input size', 'x'.join(str(s) for s in pretrained_cfg['input_size'])),
        ('Crop pct / interpolation', f'{pretrained_cfg.get("crop_pct")} / {pretrained_cfg.get("interpolation")}'),
        ('Mean / std', f'{tuple(pretrained_cfg.get("mean", ()))} / {tuple(pretrained_cfg.get("std", ()))}'),
        *finetune_rows,
    ]
    for key in ('top1', 'top5', 'parent_top1', 'parent_top5'):
        if metrics.get(key) is not None:
            rows.append((f'{key.replace("_", " ")} ({dataset_name}, %)', _pct(metrics[key])))
    if metrics.get('data_source'):  # CIFAR-10's JPEG copy (quality 75) scores lower than its official images
        rows.append(('Images (train and eval)', str(metrics['data_source'])))
    table = '\n'.join(f'| {k} | {v} |' for k, v in rows)
    recipe_yaml = yaml.safe_dump(dict(recipe_dict), sort_keys=False).rstrip()

    content = f"""---
{data.to_yaml()}
---

# {name}

`{spec_parent}` pruned to {gmacs:.3f} GMACs with **{PAPER_NAME}** (KPID, [{PAPER_ID}]({PAPER_URL})):
channels are chosen by a knapsack over their importance under a FLOPs budget. {finetuned}
A kpid-zoo build of the recipe `{name}` ([kpid-zoo](https://github.com/kpid-zoo/kpid-zoo)): timm loads it from this
repo as the generic `kpid_pruned` architecture, with the widths in its config.json. It is not the timm name
`{name}` that `import kpid_zoo` may register: a registered name is the one architecture the zoo recorded under it
(`kpid-zoo zoo` says whose).

## Usage

```python
import timm
import kpid_zoo  # registers the kpid_* architectures in timm

model = timm.create_model('hf-hub:{repo_id}', pretrained=True).eval()
data_config = timm.data.resolve_model_data_config(model)
transform = timm.data.create_transform(**data_config, is_training=False)
```

## Model details

| | |
|---|---|
{table}

Weights: `{WEIGHTS_FILE}`, sha256 `{weights_sha256}` (checked on load).
{onnx_section(onnx, pretrained_cfg)}
## Per-layer widths

![per-layer width, parent vs pruned]({WIDTHS_PLOT})

## Recipe

sha256 `{recipe_sha256}` (of the canonical JSON of the recipe)

```yaml
{recipe_yaml}
```

{CITATION}"""
    return ModelCard(content)


ONNX_HEADING = '## ONNX'


def onnx_section(onnx: Mapping[str, Any] | None, pretrained_cfg: Mapping[str, Any]) -> str:
    """The card's section on model.onnx (with a blank line before it), or '' when the export has none."""
    if not onnx or not onnx.get('file'):
        return ''
    size = ', '.join(str(s) for s in pretrained_cfg['input_size'])
    check = onnx.get('check') or {}
    return f"""
{ONNX_HEADING}

`{onnx['file']}` is this network as an ONNX graph (opset {onnx.get('opset')}, input `{onnx.get('input')}` of shape
(batch, {size}) with a dynamic batch axis, output `{onnx.get('output')}`), sha256 `{onnx.get('sha256')}`, exported
from the weights above. Checked at export: on {check.get('inputs', 'real images')}, ONNX Runtime's outputs are
within the tolerance float32 rounding allows around the exact network's (at most
{float(check.get('onnxruntime_max_ratio', float('nan'))):.2g} of it). Preprocess images as for timm (above), then:

```python
import onnxruntime as ort

session = ort.InferenceSession('{onnx['file']}', providers=['CPUExecutionProvider'])
logits = session.run(None, {{'{onnx.get('input')}': batch}})[0]  # batch: float32, N x {size.replace(', ', ' x ')}
```
"""


def with_onnx_section(card: str, onnx: Mapping[str, Any], pretrained_cfg: Mapping[str, Any]) -> str:
    """`card` (a card `build_card` wrote) with its model.onnx section put in or replaced."""
    section = onnx_section(onnx, pretrained_cfg)
    start = card.find('\n' + ONNX_HEADING + '\n')
    if start >= 0:  # the section runs to the next heading
        end = card.find('\n## ', start + 1)
        card = card[:start] + card[end if end >= 0 else len(card) :]
    anchor = card.find('\n## Per-layer widths')
    if anchor < 0:
        anchor = card.find('\n## Citation')
    if anchor < 0:
        return card.rstrip('\n') + '\n' + section
    return card[:anchor] + section + card[anchor:]


def build_zoo_card(record: Any) -> ModelCard:
    """The card of a registered zoo entry (`zoo.ZooRecord`): where its weights come from, and the zoo's numbers."""
    cfg = record.pretrained_cfg
    size = 'x'.join(str(s) for s in cfg['input_size'])
    eval_results = [
        EvalResult(
            task_type='image-classification',
            task_name='Image Classification',
            dataset_type='imagenet-1k',
            dataset_name='ImageNet-1k',
            dataset_split='validation',
            metric_type='accuracy',
            metric_name=f'Top-{k} Accuracy',
            metric_value=getattr(record, f'top{k}'),
        )
        for k in (1, 5)
        if getattr(record, f'top{k}') is not None
    ]
    data = ModelCardData(
        library_name='timm',
        pipeline_tag='image-classification',
        license=cfg.get('license', 'apache-2.0'),
        tags=['image-classification', 'timm', 'pruning', 'kpid', 'knapsack-pruning'],
        datasets=['imagenet-1k'],
        model_name=record.name,
        eval_results=eval_results or None,
        metrics=['accuracy'],
    )
    if record.source == 'timm':
        origin = (
            f"The weights are the KPID authors' own (Aflalo et al., 2020, [{PAPER_ID}]({PAPER_URL})), released "
            f'through timm as `{record.source_model}`: `pretrained=True` downloads `{record.weights_file}` from '
            f'[{record.hf_hub_id}](https://huggingface.co/{record.hf_hub_id}) and checks it against the sha256 '
            f'the Hub reports for it. kpid-zoo ships only the architecture: the width of every channel group '
            f"of `{record.parent}`, read off timm's model by `python -m kpid_zoo.zoo.sources`."
        )
    else:
        origin = (
            f'Built by kpid-zoo from the recipe `{record.source_model}`; weights `{record.weights_file}` in '
            f'[{record.hf_hub_id}](https://huggingface.co/{record.hf_hub_id}), sha256 '
            f'`{record.weights_sha256}` (checked on load).'
        )
    from .records import RENAMED  # the zoo module imports nothing heavy; imported here to keep this one standalone

    former = sorted(old for old, new in RENAMED.items() if new == record.name)
    names = (
        f'\n\nOne name, one architecture: `{record.name}` is these widths, and a kpid-zoo build of the recipe '
        f'`recipes/{record.name}.yaml` (the same parent and FLOPs target) is its own architecture, loaded '
        f'from its Hub repo, never this name.'
    )
    if former:
        names += (
            f' Formerly registered as {", ".join(f"`{n}`" for n in former)}, which still builds this model '
            f'with a deprecation warning.'
        )
    rows = [
        ('Parent', f'`{record.parent}`'),
        (
            'Weights',
            f'{record.origin}: ' + (f'`{record.source_model}`' if record.source == 'timm' else record.hf_hub_id),
        ),
        (f'GMACs at {size} (fvcore)', f'{record.gmacs:.3f}'),
        ('Params', f'{record.params / 1e6:.2f} M'),
        (
            'Input size / test input size',
            f'{size} / {"x".join(str(s) for s in cfg.get("test_input_size") or cfg["input_size"])}',
        ),
        ('Crop pct / interpolation', f'{cfg.get("crop_pct")} / {cfg.get("interpolation")}'),
        ('Mean / std', f'{tuple(cfg["mean"])} / {tuple(cfg["std"])}'),
    ]
    if record.top1 is not None:
        rows.append(
            (f'ImageNet-1k top-1 / top-5 at {record.eval_size} px (%)', f'{record.top1:.3f} / {record.top5:.3f}')
        )
        rows.append(('Accuracy source', record.metrics_source))
    table = '\n'.join(f'| {k} | {v} |' for k, v in rows)
    content = f"""---
{data.to_yaml()}
---

# {record.name}

{record.description}. {origin}{names}

## Usage

```python
import timm
import kpid_zoo  # registers the kpid_* models in timm

model = timm.create_model('{record.name}', pretrained=True).eval()
data_config = timm.data.resolve_model_data_config(model)
transform = timm.data.create_transform(**data_config, is_training=False)
```

`timm.create_model('{record.name}')` builds the architecture offline, with no network call.

## Model details

| | |
|---|---|
{table}

{CITATION}"""
    return ModelCard(content)
