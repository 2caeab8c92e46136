"""The trainer (blip2_lab.train): determinism, bitwise resume, frozen parts untouched, feature cache, guards.

Fast checks use the toy model exported by the trainer; the same properties are checked on the real
tiny `Blip2Stage1` / `Blip2Stage2` once blip2_lab.stage1 / stage2 provide them.
"""
import json, os, subprocess, sys
from pathlib import Path
import pytest, torch
from safetensors.torch import load_file
from blip2_lab.config import get_preset, apply_overrides, ConfigError, Blip2LabError
from blip2_lab import train as T
from blip2_lab import checkpoint as C
from blip2_lab.files import RunLocked
from blip2_lab._toys import ToyModel, ToyDataset
from blip2_lab.bench import bench_stage1

os.environ.setdefault('HF_HUB_OFFLINE', '1')


def toy_cfg(**kw):
    base = {'device': 'cpu', 'stage1.steps': 10, 'stage1.batch_size': 8, 'stage1.lr': 3e-2, 'stage1.warmup_steps': 2,
            'stage1.log_every': 1, 'stage1.ckpt_every': 4}
    return apply_overrides(get_preset('tiny'), {**base, **kw})


def toy_train(out, cfg=None, model_cls=ToyModel, **kw):
    torch.manual_seed(0)
    m = model_cls()
    final = T.train(cfg or toy_cfg(), 1, out, model=m, dataset=ToyDataset(64), progress=False, **kw)
    return m, final


def same_params(a, b):
    for (n, p), (_, q) in zip(a.named_parameters(), b.named_parameters()):
        assert torch.equal(p, q), n


def test_same_seed_same_weights_other_seed_differs(tmp_path):
    a, _ = toy_train(tmp_path/'a'); b, _ = toy_train(tmp_path/'b')
    same_params(a, b)
    c, _ = toy_train(tmp_path/'c', toy_cfg(**{'stage1.seed': 1}))
    assert not torch.equal(a.vision_proj.weight, c.vision_proj.weight)


def test_resume_is_bitwise(tmp_path):
    full, _ = toy_train(tmp_path/'full')
    toy_train(tmp_path/'cut', stop_after=5)               # interrupted after 5 of 10 steps (checkpoint at 4 and at 5)
    st = json.loads((tmp_path/'cut'/'step-0000005'/'trainer_state.json').read_text())
    assert st['step'] == 5 and st['samples_seen'] == 40
    resumed, final = toy_train(tmp_path/'cut')
    same_params(full, resumed)
    la = (tmp_path/'full'/'metrics.jsonl').read_text().splitlines()
    lb = (tmp_path/'cut'/'metrics.jsonl').read_text().splitlines()
    strip = lambda l: {k: v for k, v in json.loads(l).items() if k not in ('wall_s', 'samples_per_s')}
    assert [strip(l) for l in la] == [strip(l) for l in lb]
    # optimizer moments came back too: resuming from `final` again changes nothing
    again, _ = toy_train(tmp_path/'cut')
    same_params(full, again)


def test_no_resume_refuses_a_used_folder_overwrite_moves_it_aside(tmp_path):
    toy_train(tmp_path/'r', stop_after=4)
    with pytest.raises(ConfigError, match=r'already holds a run.*--overwrite'):
        toy_train(tmp_path/'r', resume=False)
    m, _ = toy_train(tmp_path/'r', overwrite=True)
    full, _ = toy_train(tmp_path/'f')
    same_params(full, m)                                 # a clean start, nothing of the old run mixed in
    old, = tmp_path.glob('r.old-*')
    assert (old/'step-0000004').is_dir() and (old/'metrics.jsonl').exists()


HOLD_LOCK = """import sys, time
from blip2_lab.train import run_lock
with run_lock(sys.argv[1]):
    print('locked', flush=True)
    time.sleep(120)
"""


def test_run_lock_second_process_refused_dead_holder_does_not_block(tmp_path):
    out = tmp_path/'r'
    holder = subprocess.Popen([sys.executable, '-c', HOLD_LOCK, str(out)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == 'locked'
        with pytest.raises(RunLocked, match=rf'{out} is in use by another run \(pid {holder.pid}\)'):
            toy_train(out)
    finally:
        holder.kill()                                    # SIGKILL: the holder gets no chance to clean up
        holder.wait()
    assert (out/'.lock').read_text() == str(holder.pid)  # the stale lock file is still there...
    toy_train(out)                                       # ...and does not block: the kernel released the lock
    assert (out/'.lock').read_text() == str(os.getpid())


def test_frozen_parts_bit_identical_and_eval_mode(tmp_path):
    torch.manual_seed(0); m = ToyModel()
    frozen = {n: p.clone() for n, p in m.named_parameters() if not p.requires_grad}
    trainable = {n: p.clone() for n, p in m.named_parameters() if p.requires_grad}
    T.train(toy_cfg(), 1, tmp_path/'r', model=m, dataset=ToyDataset(64), progress=False)
    for n, p in m.named_parameters():
        if n in frozen: assert torch.equal(p, frozen[n]), n
    assert any(not torch.equal(p, trainable[n]) for n, p in m.named_parameters() if n in trainable)
    saved = load_file(str(tmp_path/'r'/'final'/'model.safetensors'))
    assert set(saved) == set(trainable)                  # checkpoints hold the trainable part only


def test_feature_cache_same_weights_encoded_once(tmp_path):
    class Counting(ToyModel):
        calls = 0
        def encode_image(self, x):
            Counting.calls += len(x); return super().encode_image(x)
    cached, _ = toy_train(tmp_path/'c', toy_cfg(**{'stage1.steps': 20}), Counting)   # 20 steps x 8 = 2.5 epochs of 64
    n_cached = Counting.calls; Counting.calls = 0
    plain, _ = toy_train(tmp_path/'p', toy_cfg(**{'stage1.steps': 20, 'stage1.cache_features': False}), Counting)
    assert n_cached == 64 and Counting.calls == 160
    same_params(cached, plain)
    aug, _ = toy_train(tmp_path/'a', toy_cfg(**{'stage1.steps': 2, 'vision.augment': True}), Counting)
    assert Counting.calls == 160 + 16                    # augmentation on: no cache


def test_nan_guard_names_step_and_component_keeps_last_good(tmp_path):
    class NaNAt(ToyModel):
        n = 0
        def forward(self, b):
            o = super().forward(b); self.n += 1
            if self.n == 7: o['itm_loss'] = o['itm_loss'] + float('inf'); o['loss'] = o['loss'] + o['itm_loss']
            return o
    with pytest.raises(T.TrainingDiverged, match=r'loss, itm_loss became inf at step 7.*step-0000004'):
        toy_train(tmp_path/'n', model_cls=NaNAt)
    w = load_file(str(tmp_path/'n'/'step-0000004'/'model.safetensors'))
    assert all(torch.isfinite(t).all() for t in w.values())
    assert not (tmp_path/'n'/'final').exists()


def test_config_mismatch_names_fields(tmp_path):
    toy_train(tmp_path/'r')
    other = toy_cfg(**{'qformer.num_hidden_layers': 3, 'llm.max_txt_len': 16})
    with pytest.raises(ConfigError, match=r'qformer.num_hidden_layers \(checkpoint 2, now 3\).*llm.max_txt_len'):
        toy_train(tmp_path/'r', other)
    with pytest.raises(ConfigError, match='stage1.batch_size'):
        toy_train(tmp_path/'r', toy_cfg(**{'stage1.batch_size': 4}))
    with pytest.raises(ConfigError, match=r'qformer.num_hidden_layers \(checkpoint 2, now 3\)'):
        C.load_checkpoint(tmp_path/'r'/'final', cfg=other, model=ToyModel())


def test_ablation_switches(tmp_path):
    with pytest.raises(ConfigError, match='nothing to train'):
        T.train(toy_cfg(**{'stage1.enabled': False}), 1, tmp_path/'x', model=ToyModel(), dataset=ToyDataset(), progress=False)
    with pytest.raises(Blip2LabError, match='ignores stage1'):
        toy_train(tmp_path/'w', toy_cfg(**{'stage1.itc_weight': 0.0}))
    s2 = apply_overrides(toy_cfg(), {'stage2.steps': 2})
    with pytest.raises(ConfigError, match='needs init_from'):
        T.train(s2, 2, tmp_path/'s2', model=ToyModel(), dataset=ToyDataset(), progress=False)
    with pytest.raises(ConfigError, match='drop --init'):
        T.train(apply_overrides(s2, {'stage1.enabled': False}), 2, tmp_path/'s2', init_from=tmp_path, model=ToyModel(),
                dataset=ToyDataset(), progress=False)


def test_cli_errors(capsys):
    from blip2_lab.cli import main
    assert main(['train', '--stage', '1', '--out', '/tmp/nowhere', 'stage1.steps']) == 2
    assert 'key.sub=value' in capsys.readouterr().err
    assert main(['train', '--preset', 'tiny', '--stage', '1', '--out', '/tmp/nowhere', 'stage1.lr=-1']) == 2
    assert 'stage1.lr' in capsys.readouterr().err


# ---- the real models (skipped until blip2_lab.stage1 / stage2 provide them) ----

def _has(mod, cls):
    try:
        return hasattr(__import__(f'blip2_lab.{mod}', fromlist=[cls]), cls)
    except Exception:
        return False


def real_cfg(**kw):
    base = {'device': 'cpu', 'stage1.steps': 4, 'stage1.batch_size': 8, 'stage1.ckpt_every': 2, 'stage1.log_every': 1,
            'stage2.steps': 4, 'stage2.batch_size': 8, 'stage2.ckpt_every': 2, 'stage2.log_every': 1}
    return apply_overrides(get_preset('tiny'), {**base, **kw})


@pytest.mark.skipif(not _has('stage1', 'Blip2Stage1'), reason='Blip2Stage1 has not landed yet')
def test_stage1_tiny_resume_bitwise_frozen_intact(tmp_path):
    cfg = real_cfg()
    f1 = T.train(cfg, 1, tmp_path/'a', progress=False)
    rows = [json.loads(l) for l in (tmp_path/'a'/'metrics.jsonl').read_text().splitlines()]
    assert {'itc_loss', 'itm_loss', 'itg_loss'} <= set(rows[0])
    T.train(cfg, 1, tmp_path/'b', progress=False, stop_after=3)
    f2 = T.train(cfg, 1, tmp_path/'b', progress=False)
    wa, wb = load_file(str(f1/'model.safetensors')), load_file(str(f2/'model.safetensors'))
    assert wa.keys() == wb.keys()
    for k in wa: assert torch.equal(wa[k], wb[k]), k
    m, c = C.load_checkpoint(f1)
    fresh = C.build_model(cfg, 1, seed=cfg.stage1.seed)
    trainable = set(C.trainable_named(m))
    fresh_sd = dict(fresh.named_parameters())
    for n, p in m.named_parameters():
        if n not in trainable: assert torch.equal(p, fresh_sd[n]), f'frozen {n} changed'


@pytest.mark.skipif(not _has('stage1', 'Blip2Stage1'), reason='Blip2Stage1 has not landed yet')
def test_cli_tiny_refuses_mixing_survives_damage_refuses_bad_weights(tmp_path, capsys):
    from blip2_lab.cli import main
    out = tmp_path/'r'
    args = ['train', '--preset', 'tiny', '--stage', '1', '--out', str(out), '--no-progress', 'device=cpu',
            'stage1.steps=2', 'stage1.batch_size=8', 'stage1.ckpt_every=1', 'stage1.log_every=1']
    assert main(args) == 0
    capsys.readouterr()
    assert main(args + ['--no-resume']) == 2             # a used folder is not silently reused
    err = capsys.readouterr().err
    assert f'error: {out} already holds a run' in err and '--overwrite' in err
    assert main(args + ['stage1.lr=0.5']) == 2           # nor resumed under another config
    assert 'stage1.lr (checkpoint 0.0001, now 0.5)' in capsys.readouterr().err
    with open(out/'metrics.jsonl', 'a') as f: f.write('{"step": 44, "')       # a full disk mid-line
    (out/'final'/'trainer_state.json').write_text('{"step": 2, "rn')           # and a broken newest checkpoint
    assert main(args + ['stage1.steps=3']) == 0              # extending the run is allowed
    err = capsys.readouterr().err
    assert f"warning: skipping the broken checkpoint {out/'final'}" in err
    assert 'warning:' in err and 'torn last line 3' in err
    assert [json.loads(l)['step'] for l in (out/'metrics.jsonl').read_text().splitlines()] == [1, 2, 3]
    w = load_file(str(out/'final'/'model.safetensors'))
    name = sorted(w)[0]
    w[name] = w[name] * float('nan')
    from safetensors.torch import save_file
    save_file(w, str(out/'final'/'model.safetensors'))
    with pytest.raises(C.BrokenCheckpoint, match=rf"model.safetensors: tensor {name} has max \|w\| = nan"):
        C.load_checkpoint(out/'final')                   # what `blip2-lab eval` calls


@pytest.mark.skipif(not (_has('stage1', 'Blip2Stage1') and _has('stage2', 'Blip2Stage2')), reason='models have not landed yet')
def test_stage2_starts_from_stage1(tmp_path):
    cfg = real_cfg()
    f1 = T.train(cfg, 1, tmp_path/'s1', progress=False)
    f2 = T.train(cfg, 2, tmp_path/'s2', init_from=f1, progress=False, stop_after=0)   # no step: the initial state
    w1, w2 = load_file(str(f1/'model.safetensors')), load_file(str(f2/'model.safetensors'))
    shared = [k for k in w2 if k in w1]
    assert any('qformer' in k for k in shared)
    for k in shared: assert torch.equal(w1[k], w2[k]), k
    rows = [json.loads(l) for l in (tmp_path/'s1'/'metrics.jsonl').read_text().splitlines()]
    assert rows


@pytest.mark.skipif(not _has('stage1', 'Blip2Stage1'), reason='Blip2Stage1 has not landed yet')
def test_bench_stage1_same_losses_as_hf_built_step(tmp_path, capsys):
    assert bench_stage1(['--preset', 'tiny', '--steps', '1', '--warmup', '0', '--device', 'cpu', '--json', str(tmp_path/'b.json')]) == 0
    res = json.loads((tmp_path/'b.json').read_text())
    assert res['ours_samples_per_s'] > 0 and res['hf_samples_per_s'] > 0
    assert all(v < 1e-5 for v in res['loss_abs_diff_eval'].values()), res['loss_abs_diff_eval']
    assert json.loads(capsys.readouterr().out) == res
