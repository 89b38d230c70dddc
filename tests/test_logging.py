"""Log lines: the command line's -v/-q, the handler it gives the kpid_zoo logger, and main-process-only lines."""

import logging

import pytest
import yaml
from accelerate.state import PartialState

from kpid_zoo.cli import main
from kpid_zoo.core.logs import get_logger, is_main_process
from kpid_zoo.core.provenance import Stage
from kpid_zoo.training.accelerator import process_accelerator

STAGE_LINE = 'build: pruned: not built yet: running it'
RESULT_LINE = 'FLOPs error vs target'


def _prune(tmp_path, *flags):
    tmp_path.mkdir(parents=True, exist_ok=True)
    recipe = tmp_path / 'recipe.yaml'
    recipe.write_text(
        yaml.safe_dump(
            {
                'name': 'log_resnet18',
                'parent': {'model': 'resnet18', 'weights': 'none'},
                'input_size': [3, 64, 64],
                'flops': {'target_ratio': 0.5, 'tolerance': 0.02},
                'importance': {'method': 'magnitude'},
                'data': {'dataset': 'imagefolder', 'root': 'unused-by-magnitude-importance'},
            }
        )
    )
    return [*flags, 'prune', str(recipe), '--out', str(tmp_path / 'pruned')]


def _console_handlers():
    return [h for h in logging.getLogger('kpid_zoo').handlers if type(h).__name__ == '_ConsoleHandler']


def test_info_lines_by_default_none_with_q_and_debug_lines_with_v(tmp_path, capsys):
    assert main(_prune(tmp_path / 'default')) == 0
    out, err = capsys.readouterr()
    assert STAGE_LINE in out.splitlines() and RESULT_LINE in out  # bare messages, as print wrote them
    assert 'prune: ' in out and 'torch thread(s)' in out  # the thread policy's line
    assert 'checking' not in out  # a debug line

    assert main(_prune(tmp_path / 'quiet', '-q')) == 0
    out, err = capsys.readouterr()
    assert RESULT_LINE in out  # the command's result is its output, not a log line
    assert STAGE_LINE not in out and 'torch thread(s)' not in out
    assert 'knapsack' not in err  # -q implies the command's --quiet: no progress bars

    assert main(_prune(tmp_path / 'verbose', '--verbose')) == 0
    out, err = capsys.readouterr()
    assert STAGE_LINE in out and RESULT_LINE in out
    assert f'build: pruned: checking {tmp_path / "verbose" / "pruned"} against ' in out
    assert not _console_handlers()  # each main() takes its handlers away again


def test_warnings_go_to_stderr_even_with_q(tmp_path, capsys):
    argv = _prune(tmp_path, '-q')
    assert main(argv) == 0
    capsys.readouterr()
    assert main(argv) == 0  # the folder exists now: said on stderr, the result still on stdout
    out, err = capsys.readouterr()
    assert 'exists: showing it if it is up to date' in err and 'exists' not in out and RESULT_LINE in out


def test_repeated_main_calls_write_each_line_once(tmp_path, capsys):
    for run in ('a', 'b'):
        assert main(_prune(tmp_path / run)) == 0
        assert capsys.readouterr().out.count(STAGE_LINE) == 1
    assert not _console_handlers() and logging.getLogger('kpid_zoo').level == logging.NOTSET


def test_v_and_q_exclude_each_other(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(['-v', '-q', 'zoo'])
    assert exit_.value.code == 2 and 'not allowed with argument' in capsys.readouterr().err


def _stage_check(tmp_path):
    Stage('pruned', tmp_path, tmp_path / 'pruned', ('model.safetensors',), {'x': 1}).check()


def test_a_stage_line_is_written_by_the_main_process_only(tmp_path, caplog, monkeypatch):
    caplog.set_level(logging.INFO, logger='kpid_zoo')
    process_accelerator()  # Accelerate's state, as every build makes it
    _stage_check(tmp_path)
    assert [r.getMessage() for r in caplog.records] == [STAGE_LINE]
    caplog.clear()
    # the second process of a launch: the same code runs, and says nothing
    monkeypatch.setitem(PartialState._shared_state, 'process_index', 1)
    assert not is_main_process()
    _stage_check(tmp_path)
    assert caplog.records == []
    get_logger('kpid_zoo.test').info('every rank', main_process_only=False)
    assert [r.getMessage() for r in caplog.records] == ['every rank']


def test_before_accelerates_state_exists_the_launchers_rank_decides(tmp_path, caplog, monkeypatch):
    caplog.set_level(logging.INFO, logger='kpid_zoo')
    monkeypatch.setattr(PartialState, '_shared_state', {})  # no Accelerator made yet in this process
    monkeypatch.setenv('RANK', '1')
    assert not is_main_process()
    _stage_check(tmp_path)
    assert caplog.records == []
    assert PartialState._shared_state == {}  # asking did not make Accelerate's state
    monkeypatch.setenv('RANK', '0')
    _stage_check(tmp_path)
    assert [r.getMessage() for r in caplog.records] == [STAGE_LINE]
    monkeypatch.delenv('RANK')
    assert is_main_process()
