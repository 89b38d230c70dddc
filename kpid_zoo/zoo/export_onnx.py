"""`kpid-zoo export-onnx DIR`: add model.onnx to an export folder written before exports had one.

The network is rebuilt the way a pretrained load builds it (`timm.create_model('local-dir:DIR', pretrained=True)`:
config.json checked as hostile input, its binding to the weights, the weights' sha256 and shapes), exported and
checked as an export does it (`_onnx.make_onnx`), and the folder is rewritten whole, staged beside it and swapped
in (`files.staged_dir`): model.onnx, config.json's `kpid.onnx` and `kpid.files`, and the card's ONNX section
change together or not at all. Only a folder kpid-zoo exported, holding nothing but its own files, is touched
(`export.check_export_folder`); a model.onnx it did not write is never replaced.

Run again on a folder whose model.onnx was exported from its current weights and still has its recorded sha256,
it says so and writes nothing (`--force` exports it again, e.g. after upgrading torch).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

from ..core.files import file_sha256, staged_dir
from ..core.lock import acquire, export_lock_name, release
from ..core.ownership import describe, recorded_sha256
from ..deploy.onnx import DEPLOY_HINT, missing_onnx_packages
from ..errors import MissingDependencyError, RefusedError, UserError
from ._onnx import ONNX_FILE, OnnxSkipped, check_images, finish_record, make_onnx
from .card import with_onnx_section
from .export import CARD_FILE, CONFIG_FILE, WRITTEN_FILES, check_export_folder, read_export_config

__all__ = ['add_onnx']

logger = logging.getLogger(__name__)


def _up_to_date(folder: Path, kpid: dict, listed: dict[str, str]) -> bool:
    onnx = kpid.get('onnx')
    return (
        isinstance(onnx, dict)
        and onnx.get('file') == ONNX_FILE
        and onnx.get('weights_sha256') == kpid['weights_sha256']
        and onnx.get('sha256') == listed.get(ONNX_FILE)
        and file_sha256(folder / ONNX_FILE) == listed.get(ONNX_FILE)
    )


def add_onnx(folder: str | Path, *, images: str | Path | None = None, force: bool = False) -> tuple[bool, str]:
    """Add a checked model.onnx to the export `folder`; returns (written, what happened in one line)."""
    folder = Path(folder)
    missing = missing_onnx_packages()
    if missing:
        raise MissingDependencyError(
            f'export-onnx needs the deploy extra ({", ".join(missing)} not installed): {DEPLOY_HINT}'
        )
    if folder.is_symlink() or not folder.is_dir():
        raise UserError(f'{folder}: {describe(folder)}, not an export folder (give the folder `kpid-zoo build` wrote)')
    try:
        config = read_export_config(folder)
    except ValueError as e:  # the one-line reasons of a config.json that is not a sound export's
        raise UserError(str(e)) from None
    kpid = config['kpid']
    name = kpid.get('name')
    listed = recorded_sha256(kpid.get('files'))
    if not isinstance(name, str) or not listed:
        raise RefusedError(
            f'{folder / CONFIG_FILE}: records no kpid.name / kpid.files (exported by an older kpid-zoo); '
            f're-export it with `kpid-zoo build`'
        )
    onnx_path = folder / ONNX_FILE
    if os.path.lexists(onnx_path):
        if ONNX_FILE not in listed or not onnx_path.is_file() or onnx_path.is_symlink():
            raise RefusedError(
                f'{onnx_path}: {describe(onnx_path)} that this export did not write ({CONFIG_FILE} kpid.files '
                f'does not list it); refusing to replace it (move it away)'
            )
        if file_sha256(onnx_path) != listed[ONNX_FILE]:
            raise RefusedError(
                f'{onnx_path}: not the bytes the export wrote (its sha256 differs from {CONFIG_FILE} kpid.files); '
                f'refusing to replace it (move it away)'
            )
        if not force and _up_to_date(folder, kpid, listed):
            return False, f'{onnx_path}: up to date (exported from the weights {kpid["weights_sha256"][:12]}...)'
    lock = acquire(folder.parent, export_lock_name(folder))
    try:
        # every file in the folder the export's own, proven by its sha256 (a user's file stops it here)
        check_export_folder(folder, name, option='export-onnx')
        import timm

        import kpid_zoo  # noqa: F401 (registers kpid_pruned and the checks of a pretrained load)

        model = timm.create_model(f'local-dir:{folder}', pretrained=True).eval()
        batch, inputs = check_images(config['pretrained_cfg'], images)
        try:
            data, record = make_onnx(
                model, tuple(config['pretrained_cfg']['input_size']), batch, name=name, inputs=inputs
            )
        except OnnxSkipped as e:
            raise UserError(str(e)) from None
        record = finish_record(record, data, kpid['weights_sha256'])
        card = with_onnx_section((folder / CARD_FILE).read_text(encoding='utf-8'), record, config['pretrained_cfg'])
        with staged_dir(folder, owned=WRITTEN_FILES) as tmp:
            for file in listed:
                if file not in (ONNX_FILE, CARD_FILE):
                    shutil.copy2(folder / file, tmp / file)
                    if file_sha256(tmp / file) != listed[file]:  # changed since the check: nothing is swapped in
                        raise RefusedError(f'{folder / file}: changed while export-onnx ran; run it again')
            (tmp / ONNX_FILE).write_bytes(data)
            (tmp / CARD_FILE).write_text(card, encoding='utf-8')
            kpid['onnx'] = record
            kpid['files'] = {
                f: {'sha256': file_sha256(tmp / f), 'size': (tmp / f).stat().st_size}
                for f in [*(f for f in kpid['files'] if f != ONNX_FILE), ONNX_FILE]
            }
            (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=2) + '\n')
    finally:
        release(lock)
    logger.debug('export-onnx: %s: %s', folder, record['check'])
    check = record['check']
    return True, (
        f'{onnx_path}: written (opset {record["opset"]}, dynamic batch); ONNX Runtime checked on {check["inputs"]}: '
        f'at most {check["onnxruntime_max_ratio"]:.2g} of the float32 tolerance'
    )
