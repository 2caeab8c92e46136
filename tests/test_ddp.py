"""Data parallelism: 2 processes with batch B (torchrun, gloo, CPU) == 1 process with batch 2B.

Checks, for the same global batch and the same negative draws:
- the loss components (averaged over ranks) and the averaged gradients match within 1e-5;
- `train()` under torchrun ends with the same weights and logs the same losses as one process;
- only rank 0 writes the run folder.
With the toy model (ITC with negatives gathered from all ranks + a generator-drawn negative) always,
and with the real `Blip2Stage1` (ITC, ITM, ITG) when blip2_lab.stage1 provides it.
"""
import json, os, subprocess, sys, textwrap
from pathlib import Path
import pytest, torch

ROOT = Path(__file__).resolve().parents[1]

WORKER = textwrap.dedent('''
    import json, os, sys
    from pathlib import Path
    import torch, torch.distributed as dist
    from blip2_lab.config import get_preset, apply_overrides
    from blip2_lab import train as T

    out, kind, B = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3])

    def make(kind, cfg):
        torch.manual_seed(0)
        if kind == 'toy': return T.ToyModel(dropout=0.0), T.ToyDataset(64)
        from blip2_lab.stage1 import Blip2Stage1
        return Blip2Stage1(cfg), T.build_dataset(cfg)

    def cfg_for(B):
        return apply_overrides(get_preset('tiny'), {'device': 'cpu', 'stage1.steps': 3, 'stage1.batch_size': B,
            'stage1.lr': 1e-3, 'stage1.warmup_steps': 1, 'stage1.log_every': 1, 'stage1.ckpt_every': 2,
            'qformer.hidden_dropout_prob': 0.0, 'qformer.attention_probs_dropout_prob': 0.0})

    def grads_one_step(kind, B):
        "Loss components and averaged gradients of step 0 on this rank (one process: B is the global batch)."
        cfg = cfg_for(B)
        rank, world = T.setup_distributed(torch.device('cpu'))
        model, ds = make(kind, cfg)
        T.broadcast_parameters(model)
        if hasattr(model, 'set_generator'): model.set_generator(torch.Generator().manual_seed(0))
        model.train()
        idx = T.batch_indices(0, len(ds), B, 0, rank, world)
        batch = model.collate([ds[i] for i in idx])
        o = model(batch)
        names = T.trainable_named(model)
        o['loss'].backward()
        T.sync_gradients(list(names.values()))
        comps = {k: v.detach().clone() for k, v in o.items() if torch.is_tensor(v) and v.ndim == 0}
        if world > 1:
            for v in comps.values(): dist.all_reduce(v); v /= world
        return {k: float(v) for k, v in comps.items()}, {n: p.grad.clone() for n, p in names.items() if p.grad is not None}

    if __name__ == '__main__':
        losses, grads = grads_one_step(kind, B)
        rank, world = T._world()
        if rank == 0:
            out.mkdir(parents=True, exist_ok=True)
            (out/'losses.json').write_text(json.dumps(losses))
            from safetensors.torch import save_file
            save_file({k: v.contiguous() for k, v in grads.items()}, str(out/'grads.safetensors'))
        if kind == 'toy':
            model, ds = make(kind, cfg_for(B))
            T.train(cfg_for(B), 1, out/'run', model=model, dataset=ds, progress=False)
        else:
            T.train(cfg_for(B), 1, out/'run', progress=False)
        if world > 1: dist.destroy_process_group()
''')


def _have_stage1():
    try:
        from blip2_lab.stage1 import Blip2Stage1  # noqa
        return True
    except Exception:
        return False


def _run(tmp, kind, B, nproc):
    script = tmp/'worker.py'
    script.write_text(WORKER)
    out = tmp/f'{kind}-{nproc}'
    env = {**os.environ, 'OMP_NUM_THREADS': '1', 'HF_HUB_OFFLINE': '1', 'TOKENIZERS_PARALLELISM': 'false', 'PYTHONPATH': str(ROOT)}
    if nproc == 1:
        cmd = [sys.executable, str(script), str(out), kind, str(B)]
        for k in ('RANK', 'WORLD_SIZE', 'LOCAL_RANK', 'MASTER_ADDR', 'MASTER_PORT'): env.pop(k, None)
    else:
        cmd = [sys.executable, '-m', 'torch.distributed.run', '--standalone', f'--nproc_per_node={nproc}', str(script), str(out), kind, str(B)]
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return out


def _compare(one, two):
    from safetensors.torch import load_file
    l1, l2 = json.loads((one/'losses.json').read_text()), json.loads((two/'losses.json').read_text())
    assert l1.keys() == l2.keys()
    for k in l1: assert abs(l1[k] - l2[k]) < 1e-5, (k, l1[k], l2[k])
    g1, g2 = load_file(str(one/'grads.safetensors')), load_file(str(two/'grads.safetensors'))
    assert g1.keys() == g2.keys() and len(g1) > 0
    for k in g1: torch.testing.assert_close(g2[k], g1[k], atol=1e-5, rtol=1e-4, msg=lambda m: f'{k}: {m}')
    m1 = [json.loads(l) for l in (one/'run'/'metrics.jsonl').read_text().splitlines()]
    m2 = [json.loads(l) for l in (two/'run'/'metrics.jsonl').read_text().splitlines()]
    assert [r['step'] for r in m1] == [r['step'] for r in m2] == [1, 2, 3]
    for a, b in zip(m1, m2):
        for k in a:
            if k.endswith('loss'): assert abs(a[k] - b[k]) < 1e-5, (k, a, b)
    w1, w2 = load_file(str(one/'run'/'final'/'model.safetensors')), load_file(str(two/'run'/'final'/'model.safetensors'))
    for k in w1: torch.testing.assert_close(w2[k], w1[k], atol=1e-5, rtol=1e-4, msg=lambda m: f'{k}: {m}')
    st = json.loads((two/'run'/'final'/'trainer_state.json').read_text())
    assert st['world_size'] == 2 and len(st['rng']) == 2   # every rank's RNG state is kept for resuming
    return l1


def test_ddp_toy_equivalence(tmp_path):
    one, two = _run(tmp_path, 'toy', 16, 1), _run(tmp_path, 'toy', 8, 2)
    l = _compare(one, two)
    assert {'itc_loss', 'itm_loss'} <= set(l)


@pytest.mark.skipif(not _have_stage1(), reason='blip2_lab.stage1.Blip2Stage1 has not landed yet')
def test_ddp_stage1_equivalence(tmp_path):
    one, two = _run(tmp_path, 'stage1', 8, 1), _run(tmp_path, 'stage1', 4, 2)
    l = _compare(one, two)
    assert {'itc_loss', 'itm_loss', 'itg_loss'} <= set(l)
