"""Stage-1 learning speed: train stage 1 of the lab preset with overrides and print ITC R@1 (mean of TR@1 and IR@1,
200 test images) every EVERY steps; rows are appended to OUT.jsonl.
usage: python docs/scripts/stage1_r1.py OUT STEPS EVERY [key=value ...]"""
import json, sys, time
import torch
from blip2_lab.config import get_preset, apply_overrides
from blip2_lab import train as T
from blip2_lab.checkpoint import load_checkpoint
from blip2_lab.evaluate import RetrievalView, evaluate_retrieval
from blip2_lab.data import get_dataset, image_transform

torch.set_num_threads(1)
out, steps, every, ov = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4:]
cfg = apply_overrides(get_preset('lab'), [f'stage1.steps={steps}', f'stage1.ckpt_every={every}', *ov])
ds, tf = get_dataset(cfg.data, 'test'), image_transform(cfg.vision.image_size, train=False)
t_train = 0.
for k in range(every, steps + 1, every):
    t0 = time.time()
    ck = T.train(cfg, 1, out, progress=False, stop_after=k)   # resumes; returns out/step-k, or out/final at the end
    t_train += time.time() - t0
    m, c = load_checkpoint(ck)
    itc = evaluate_retrieval(RetrievalView.from_stage1(m.eval(), c), ds, list(range(200)), tf, k_test=1,
                             progress=False)['itc']
    last = [r for r in T.read_metrics(out) if r['step'] <= k][-1]
    rec = dict(step=k, tr1=itc['txt_r1'], ir1=itc['img_r1'], r1=(itc['txt_r1'] + itc['img_r1']) / 2,
               train_s=round(t_train, 1), overrides=ov, **{n: round(v, 3) for n, v in last.items() if n.endswith('_loss')})
    print(json.dumps(rec), flush=True)
    with open(out + '.jsonl', 'a') as f: f.write(json.dumps(rec) + '\n')
