"""The ablation lab end to end at the tiny preset, through papermill: parameters reach the notebook,
a failing run is isolated and reported, a second call resumes (skips finished runs), the CLI exits
non-zero on failure, and `run-arm` writes the same metrics as the notebook path.

One batch (three papermill runs, two at a time: `jobs=2`) is shared by the assertions; the resume
call runs one at a time, so both routes are exercised. The whole file takes about two minutes."""
import json, os, subprocess, sys, time
from pathlib import Path

import nbformat
import torch
import pytest

os.environ.setdefault('HF_HUB_OFFLINE', '1')
os.environ.setdefault('MPLBACKEND', 'Agg')
from blip2_lab.ablate import (ARMS, CLAIMS, PLOT_METRICS, ablate, batch_lock, cli_run_arm, read_run_metrics,
                              run_threads, arm_config)
from blip2_lab import train as T
from blip2_lab.checkpoint import build_model

SEED = 7                      # not the notebook's default (0): proves injection
OVERRIDES = ['stage1.steps=2', 'stage2.steps=3', 'eval.n_images=4']  # stage2.steps: not the tiny preset's 4
BROKEN = ['device=cuda:99']   # a valid config that raises inside the notebook (no such device)
ARMS_T = {'full': ARMS['full'], 'no_stage1': ARMS['no_stage1'], 'broken': BROKEN}


@pytest.fixture(scope='module')
def batch(tmp_path_factory):
    out = tmp_path_factory.mktemp('lab')
    t = time.time()
    res = ablate('tiny', ARMS_T, seeds=[SEED], out=out, overrides=OVERRIDES, progress=False, jobs=2)
    return out, res, time.time() - t


def test_failure_isolated_and_reported(batch):
    out, res, _ = batch
    assert [(f['arm'], f['seed']) for f in res['failures']] == [('broken', SEED)]
    f = res['failures'][0]
    assert isinstance(f['cell_index'], int) and f['ename'] and f['evalue'], f
    nb = nbformat.read(out/'broken'/f'seed{SEED}'/'experiment.ipynb', as_version=4)
    bad = [i for i, c in enumerate(nb.cells) if any(o.get('output_type') == 'error' for o in c.get('outputs', []))]
    assert bad == [f['notebook_cell']] and 'run_arm(' in nb.cells[bad[0]].source   # the error cell is the one that trains
    assert 'run_arm(' in f['cell_source']
    assert json.loads((out/'broken'/f'seed{SEED}'/'failed.json').read_text())['ename'] == f['ename']
    for arm in ('full', 'no_stage1'):                              # the others finished
        assert read_run_metrics(out/arm/f'seed{SEED}') is not None, arm
    md = (out/'results.md').read_text()
    assert 'Failed runs' in md and 'broken seed 7' in md


def test_parameters_reach_the_notebook(batch):
    out, _, _ = batch
    run = out/'full'/f'seed{SEED}'
    rec = json.loads((run/'metrics.json').read_text())
    assert rec['seed'] == SEED and rec['config']['stage1']['seed'] == SEED and rec['config']['stage2']['seed'] == SEED
    assert rec['overrides'] == OVERRIDES and rec['config']['stage2']['steps'] == 3
    nb = nbformat.read(run/'experiment.ipynb', as_version=4)       # the executed notebook is kept
    assert nb.metadata.papermill.parameters['seed'] == SEED
    assert nb.metadata.papermill.parameters['threads'] == run_threads(2) >= 1   # jobs=2: the cores shared out
    assert any('injected-parameters' in c.metadata.get('tags', []) for c in nb.cells)
    assert (run/'loss_stage1.png').exists() and (run/'loss_stage2.png').exists()


def test_missing_retrieval_is_missing_not_zero(batch):
    out, res, _ = batch
    rec = read_run_metrics(out/'no_stage1'/f'seed{SEED}')
    assert rec['headline']['retrieval_r1'] is None and 'retrieval' in rec['missing']
    assert read_run_metrics(out/'full'/f'seed{SEED}')['headline']['retrieval_r1'] is not None
    assert 'retrieval_r1' not in res['summary']['no_stage1']
    v = {x['claim']: x for x in res['verdicts']}
    assert set(v) == {CLAIMS[0]['claim']}                           # no_itg not in this batch
    assert v[CLAIMS[0]['claim']]['status'] in ('reproduced', 'refuted', 'inconclusive')
    assert 'spread unknown' in v[CLAIMS[0]['claim']]['text']       # one seed
    assert (out/'results.csv').read_text().startswith('arm,metric,n,mean,std')
    assert sorted(p.name for p in (out/'plots').glob('*.png')) == sorted(f'{m}.png' for m in PLOT_METRICS)
    assert {'vqa_accuracy', 'vqa_two_step', 'cider'} <= set(PLOT_METRICS)


def test_resume_skips_finished_runs(batch):
    out, _, _ = batch
    mt = {p: p.stat().st_mtime_ns for p in out.glob('*/seed*/metrics.json')}
    assert len(mt) == 2
    t = time.time()
    res = ablate('tiny', ARMS_T, seeds=[SEED], out=out, overrides=OVERRIDES, progress=False)   # jobs=1: one at a time
    assert res['skipped'] == 2 and len(res['failures']) == 1           # the failed run is retried, and fails again
    assert {p: p.stat().st_mtime_ns for p in out.glob('*/seed*/metrics.json')} == mt
    print(f'resume: {time.time() - t:.1f} s')


def test_cli_exit_code_nonzero_on_failure(tmp_path):
    exe = Path(sys.executable).parent/'blip2-lab'
    p = subprocess.run([str(exe), 'ablate', '--preset', 'tiny', '--arms', 'no_stage1', '--seeds', '0', '--out', str(tmp_path), *BROKEN],
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 1, p.stderr[-2000:]
    assert 'no_stage1 seed 0 failed' in p.stderr
    assert (tmp_path/'no_stage1'/'seed0'/'experiment.ipynb').exists() and (tmp_path/'results.md').exists()


def test_run_arm_cli_writes_the_same_metrics(batch, tmp_path):
    out, _, _ = batch
    assert cli_run_arm(['--preset', 'tiny', '--arm', 'no_stage1', '--seed', str(SEED), '--out', str(tmp_path),
                        '--threads', str(run_threads(2)), *OVERRIDES]) == 0   # the batch ran with jobs=2's threads
    a, b = read_run_metrics(tmp_path), read_run_metrics(out/'no_stage1'/f'seed{SEED}')
    for k in ('arm', 'seed', 'preset', 'overrides', 'arm_overrides', 'config', 'missing', 'tasks'):
        assert a[k] == b[k], k
    assert a['metrics'].keys() == b['metrics'].keys()
    for k, v in a['metrics'].items():
        if k.startswith('cost.') and k.endswith('_per_s'): continue   # a throughput: the clock, not the computation
        assert v == pytest.approx(b['metrics'][k], abs=1e-6), k


def test_notebook_parameters_documented():
    "papermill --help-notebook lists every parameter with its help (one '=' per line, or papermill skips it)."
    from papermill.inspection import _infer_parameters
    from papermill.iorw import load_notebook_node
    from blip2_lab.ablate import experiment_notebook
    ps = {p.name: p for p in _infer_parameters(load_notebook_node(str(experiment_notebook())))}
    assert set(ps) == {'preset', 'arm', 'seed', 'out_dir', 'overrides', 'arm_overrides', 'threads'}
    assert all(p.help and p.inferred_type_name != 'None' for p in ps.values())
    assert ps['preset'].default == "'tiny'"


# One batch per folder, and no orphans (issue 24): seconds, no training.

def _wait_for(cond, timeout=30.0, what='condition'):
    "Poll `cond()` every 0.1 s until it is true; fail after `timeout` seconds."
    end = time.time() + timeout
    while time.time() < end:
        if cond(): return
        time.sleep(0.1)
    pytest.fail(f'{what}: not within {timeout} s')


def _alive(pid: int) -> bool:
    "Whether process `pid` still runs (a zombie nobody reaped yet counts as ended)."
    try: state = Path(f'/proc/{pid}/stat').read_text().rsplit(')', 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError): return False
    return state not in ('Z', 'X')


@pytest.mark.skipif(sys.platform != 'linux', reason='flock and /proc: Linux')
def test_second_batch_refused_naming_the_holder(tmp_path):
    holder = subprocess.Popen([sys.executable, '-c', 'import sys, time; from blip2_lab.ablate import batch_lock\n'
                               'with batch_lock(sys.argv[1]): print("locked", flush=True); time.sleep(120)', str(tmp_path)],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == 'locked'
        exe = Path(sys.executable).parent/'blip2-lab'
        t = time.time()
        p = subprocess.run([str(exe), 'ablate', '--preset', 'tiny', '--arms', 'no_stage1', '--seeds', '0', '--no-papermill',
                            '--out', str(tmp_path)], capture_output=True, text=True, timeout=120)
        assert p.returncode == 2 and f'another ablate batch (pid {holder.pid}) is running in {tmp_path}' in p.stderr, p.stderr
        assert not (tmp_path/'no_stage1').exists()                       # refused before any run started
        print(f'refused in {time.time() - t:.1f} s')
    finally:
        holder.kill(); holder.wait()
    with batch_lock(tmp_path) as lock:                                   # the dead holder's lock does not block
        assert lock.read_text().strip() == str(os.getpid())


@pytest.mark.skipif(sys.platform != 'linux', reason='PR_SET_PDEATHSIG: Linux')
def test_run_arm_child_dies_with_its_batch(tmp_path):
    "A child started like _arm_subprocess starts run-arm (child_command) ends within seconds of a kill -9 of its parent."
    pidfile = tmp_path/'child.pid'
    child = "import os, sys, time; open(sys.argv[1], 'w').write(str(os.getpid())); time.sleep(120)"
    parent = subprocess.Popen([sys.executable, '-c', 'import subprocess, sys; from blip2_lab.ablate import child_command\n'
                               f'subprocess.run(child_command({child!r}, sys.argv[1]))', str(pidfile)])
    try:
        _wait_for(lambda: pidfile.exists() and pidfile.read_text().strip(), what='child started')
        pid = int(pidfile.read_text())
        assert _alive(pid)
        parent.kill(); parent.wait()                                     # kill -9: the parent runs no clean-up
        _wait_for(lambda: not _alive(pid), timeout=5, what=f'child {pid} ended after its parent was killed')
    finally:
        parent.kill(); parent.wait()
        if pidfile.exists() and _alive(int(pidfile.read_text())): os.kill(int(pidfile.read_text()), 9)


@pytest.mark.skipif(sys.platform != 'linux', reason='/proc: Linux')
def test_papermill_kernel_dies_with_its_batch(tmp_path):
    "A papermill kernel (ablate's default route) ends within seconds of a kill -9 of the process that started it."
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(
        "import os, time; open(%r, 'w').write(str(os.getpid())); time.sleep(120)" % str(tmp_path/'kernel.pid'))])
    nbformat.write(nb, tmp_path/'sleep.ipynb')
    parent = subprocess.Popen([sys.executable, '-c', 'import papermill as pm, sys\n'
                               'pm.execute_notebook(sys.argv[1], sys.argv[2], kernel_name="python3", progress_bar=False)',
                               str(tmp_path/'sleep.ipynb'), str(tmp_path/'out.ipynb')],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    pidfile = tmp_path/'kernel.pid'
    try:
        _wait_for(lambda: pidfile.exists() and pidfile.read_text().strip(), timeout=60, what='kernel started')
        pid = int(pidfile.read_text())
        assert _alive(pid)
        parent.kill(); parent.wait()
        _wait_for(lambda: not _alive(pid), timeout=5, what=f'kernel {pid} ended after its parent was killed')
    finally:
        parent.kill(); parent.wait()
        if pidfile.exists() and _alive(int(pidfile.read_text())): os.kill(int(pidfile.read_text()), 9)


def _fresh_weights(cfg, stage):
    "The weights train() starts stage `stage` from: built right after torch.manual_seed(stageN.seed)."
    tc = cfg.stage1 if stage == 1 else cfg.stage2
    torch.manual_seed(tc.seed)
    return {k: v.clone() for k, v in build_model(cfg, stage).state_dict().items()}


def test_paired_seeds_same_data_order_and_initial_weights_across_arms():
    "Seed s gives every arm the same data order and the same initial weights; only the ablation differs."
    from blip2_lab.config import config_diff
    for s in (0, 1):
        cfgs = {a: arm_config('tiny', a, seed=s) for a in ('full', 'no_stage1', 'no_itg')}
        full = cfgs['full']
        # the configs differ only in the keys that define each arm
        assert config_diff(full, cfgs['no_itg']) == ['stage1.itg_weight', 'stage2.enabled']   # Table 6: stage 1 only
        assert config_diff(full, cfgs['no_stage1']) == ['stage1.enabled']
        # data order: the same batches at every step (same seed, batch size and dataset size)
        n = full.data.n_train
        for a, c in cfgs.items():
            for st in (0, 1, 7):
                assert T.batch_indices(st, n, c.stage1.batch_size, c.stage1.seed) == \
                       T.batch_indices(st, n, full.stage1.batch_size, full.stage1.seed)
                assert T.batch_indices(st, n, c.stage2.batch_size, c.stage2.seed) == \
                       T.batch_indices(st, n, full.stage2.batch_size, full.stage2.seed)
        # initial weights: stage 1 of full and no_itg, stage 2 of all three (before stage 1's Q-Former is loaded)
        w1 = _fresh_weights(full, 1)
        for k, v in _fresh_weights(cfgs['no_itg'], 1).items(): assert torch.equal(v, w1[k]), k
        w2 = _fresh_weights(full, 2)
        for a in ('no_stage1', 'no_itg'):
            for k, v in _fresh_weights(cfgs[a], 2).items(): assert torch.equal(v, w2[k]), (a, k)
    # and another seed really changes them (the test above could not pass by accident)
    w0, w1 = (_fresh_weights(arm_config('tiny', 'full', seed=s), 1) for s in (0, 1))
    assert any(not torch.equal(v, w1[k]) for k, v in w0.items())
    assert T.batch_indices(0, n, 8, 0) != T.batch_indices(0, n, 8, 1)
