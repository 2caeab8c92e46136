"""Stage-1 learning speed: train stage 1 of the lab preset with overrides and print ITC R@1 (mean of TR@1 and IR@1,
200 test images) every EVERY steps. usage: python docs/scripts/stage1_r1.py OUT STEPS EVERY [key=value ...]"""
import sys, json, time, os
import torch
torch.set_num_threads(1)
from blip2_lab.config import get_preset, apply_overrides
from blip2_lab import train as T
from blip2_lab.evaluate import RetrievalView, evaluate_retrieval
from blip2_lab.data import get_dataset, image_transform
out, steps, every, ov = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4:]
cfg = apply_overrides(get_preset('lab'), [f'stage1.steps={steps}', f'stage1.ckpt_every={every}', *ov])
ds = get_dataset(cfg.data, 'test'); idx = list(range(200)); tf = image_transform(cfg.vision.image_size, train=False)
log = open(out + '.jsonl', 'a')
t_train = 0.
for k in range(every, steps + 1, every):
    t0 = time.time()
    ck = T.train(cfg, 1, out, progress=False, stop_after=k if k < steps else None)
    t_train += time.time() - t0
    cks = sorted(p for p in __import__('pathlib').Path(out).glob('step-*'))
    ck = [p for p in cks if int(p.name.split('-')[1]) == k]
    ck = ck[0] if ck else ck
    m, c = T.load_checkpoint(ck if k < steps else __import__('pathlib').Path(out)/'final')
    m.eval()
    r = evaluate_retrieval(RetrievalView.from_stage1(m, c), ds, idx, tf, k_test=1, batch_size=64, progress=False)
    itc = r['itc']
    rec = dict(step=k, tr1=itc['txt_r1'], ir1=itc['img_r1'], r1=(itc['txt_r1'] + itc['img_r1']) / 2,
               train_s=round(t_train, 1), overrides=ov)
    rows = [json.loads(l) for l in open(out + '/metrics.jsonl')]
    last = [x for x in rows if x['step'] <= k][-1]
    rec.update({kk: round(v, 3) for kk, v in last.items() if kk.endswith('_loss')})
    print(json.dumps(rec), flush=True); log.write(json.dumps(rec) + '\n'); log.flush()
