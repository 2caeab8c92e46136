"""Stage 1 under torch.distributed: 2 gloo processes x B pairs must equal 1 process x 2B pairs
(ITC with gathered negatives, the hard-negative draws, ITM, ITG over unequal token counts, and the gradients), and the
single-process checks that are too slow for the notebook."""
import os, socket, tempfile
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

os.environ.setdefault('HF_HUB_OFFLINE', '1')
os.environ.setdefault('OMP_NUM_THREADS', '1')

from blip2_lab.config import get_preset, apply_overrides
from blip2_lab.stage1 import itc_loss, sample_hard_negatives, Blip2Stage1, Stage1Error
from blip2_lab.distributed import concat_all_gather, all_gather_with_grad, dist_info

B, NQ, E = 4, 3, 8
TEXTS = ['a red circle left of a blue square', 'a green star above a red circle', 'two blue squares', 'a yellow triangle',
         'one red square right of a circle', 'a blue circle above two green stars', 'three shapes', 'a small red star left of a cross']
# captions of different lengths: rank 0 and rank 1 hold different numbers of ITG tokens


def _free_port():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0)); return s.getsockname()[1]


def _features(n):
    g = torch.Generator().manual_seed(1)
    return F.normalize(torch.randn(n, NQ, E, generator=g), dim=-1), F.normalize(torch.randn(n, E, generator=g), dim=-1)


def _tiny_cfg():
    return apply_overrides(get_preset('tiny'), ['qformer.hidden_dropout_prob=0', 'qformer.attention_probs_dropout_prob=0'])


def _model_grads(model, batch):
    out = model(batch)
    model.zero_grad(set_to_none=True)
    out['loss'].backward()
    grads = {n: (p.grad.clone() if p.grad is not None else torch.zeros_like(p)) for n, p in model.qformer.named_parameters()}
    return {k: v.detach() for k, v in out.items()}, grads


def _model_batch(model, lo, hi):
    g = torch.Generator().manual_seed(2)
    embeds = torch.randn(2 * B, 17, model.vision.width, generator=g)
    ids, att = model.tokenize(TEXTS[lo:hi])
    return dict(image_embeds=embeds[lo:hi], input_ids=ids, attention_mask=att, image_ids=torch.arange(lo, hi))


def _worker(rank, world, port, path):
    os.environ.update(MASTER_ADDR='127.0.0.1', MASTER_PORT=str(port))
    dist.init_process_group('gloo', rank=rank, world_size=world)
    try:
        res = {}
        assert dist_info() == (rank, world)
        # gathers
        x = torch.full((2, 3), float(rank), requires_grad=True)
        res['gathered'] = concat_all_gather(x.detach())
        (all_gather_with_grad(x) * torch.arange(1., 2 * world + 1)[:, None]).sum().backward()
        res['gather_grad'] = x.grad
        # ITC and the hard-negative draws on this rank's slice
        img, txt = _features(2 * B)
        img = img[rank * B:(rank + 1) * B].clone().requires_grad_(True)
        txt = txt[rank * B:(rank + 1) * B].clone().requires_grad_(True)
        loss, s_i2t, s_t2i = itc_loss(img, txt, 0.1)
        loss.backward()
        res.update(itc=loss.detach(), img_grad=img.grad, txt_grad=txt.grad, sim_i2t=s_i2t.detach())
        res['neg'] = sample_hard_negatives(s_i2t, s_t2i, generator=torch.Generator().manual_seed(7))
        # the whole stage-1 model
        torch.manual_seed(0)
        model = Blip2Stage1(_tiny_cfg()).eval()
        out, grads = _model_grads(model, _model_batch(model, rank * B, (rank + 1) * B))
        for k, v in out.items():
            dist.all_reduce(v); res['model_' + k] = v / world
        for k, v in grads.items():
            dist.all_reduce(v); grads[k] = v / world
        res['model_grads'] = grads
        torch.save(res, f'{path}/rank{rank}.pt')
        dist.barrier()   # no rank tears gloo down while another still talks to it (rank 0 once aborted: 'terminate called')
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope='module')
def two_procs():
    with tempfile.TemporaryDirectory() as d:
        mp.start_processes(_worker, args=(2, _free_port(), d), nprocs=2, join=True, start_method='spawn')
        yield [torch.load(f'{d}/rank{r}.pt', weights_only=False) for r in range(2)]


def test_gathers(two_procs):
    for r, res in enumerate(two_procs):
        assert torch.equal(res['gathered'], torch.tensor([[0.] * 3] * 2 + [[1.] * 3] * 2))
        # d/dx of sum(gathered * row weight): rows r*2.. of the weights, summed over both processes' losses
        want = 2 * torch.arange(1., 5.)[r * 2:(r + 1) * 2, None].expand(2, 3)
        assert torch.equal(res['gather_grad'], want)


def test_itc_two_procs_equals_one(two_procs):
    img, txt = _features(2 * B)
    img.requires_grad_(True); txt.requires_grad_(True)
    loss, s_i2t, s_t2i = itc_loss(img, txt, 0.1)
    loss.backward()
    # DDP averages gradients: the mean of the per-rank losses is the 2B loss
    assert torch.allclose(sum(r['itc'] for r in two_procs) / 2, loss.detach(), atol=1e-6)
    for r, res in enumerate(two_procs):
        sl = slice(r * B, (r + 1) * B)
        assert torch.allclose(res['sim_i2t'], s_i2t.detach()[sl], atol=1e-6)
        assert torch.allclose(res['img_grad'] / 2, img.grad[sl], atol=1e-6)
        assert torch.allclose(res['txt_grad'] / 2, txt.grad[sl], atol=1e-6)
    full = sample_hard_negatives(s_i2t.detach(), s_t2i.detach(), generator=torch.Generator().manual_seed(7))
    for r, res in enumerate(two_procs):
        assert torch.equal(res['neg'][0], full[0][r * B:(r + 1) * B])
        assert torch.equal(res['neg'][1], full[1][r * B:(r + 1) * B])


def test_model_two_procs_equals_one(two_procs):
    torch.manual_seed(0)
    model = Blip2Stage1(_tiny_cfg()).eval()
    out, grads = _model_grads(model, _model_batch(model, 0, 2 * B))
    res = two_procs[0]
    counts = model.tokenize(TEXTS)[1].sum(1)
    assert counts[:B].sum() != counts[B:].sum()
    for k in ('loss', 'itc_loss', 'itm_loss', 'itg_loss'):
        assert torch.allclose(res['model_' + k], out[k], atol=1e-5), (k, res['model_' + k], out[k])
    worst = max((res['model_grads'][n] - g).abs().max().item() for n, g in grads.items())
    assert worst < 1e-5, worst


def test_itm_needs_two_images():
    sim = torch.zeros(1, 1)
    assert sample_hard_negatives(sim, sim)[0].item() == -1   # no candidate: the row is left out of ITM
    with pytest.raises(Stage1Error, match='same shape'):
        sample_hard_negatives(torch.zeros(2, 2), torch.zeros(2, 3))
    with pytest.raises(Stage1Error, match='fit'):
        sample_hard_negatives(torch.zeros(2, 2), torch.zeros(2, 2), offset=1)


def test_all_weights_zero_fails():
    cfg = apply_overrides(get_preset('tiny'), ['stage1.itc_weight=0', 'stage1.itm_weight=0', 'stage1.itg_weight=0'])
    m = Blip2Stage1(cfg)
    with pytest.raises(Stage1Error, match='nothing to train'):
        m(dict(image_embeds=torch.randn(2, 17, m.vision.width), text=['a', 'b']))


def test_trainable_state_roundtrip():
    cfg = get_preset('tiny')
    a, b = Blip2Stage1(cfg), Blip2Stage1(get_preset('tiny'))
    with torch.no_grad(): a.qformer.query_tokens.add_(1.)
    b.load_trainable_state_dict(a.trainable_state_dict())
    assert torch.equal(a.qformer.query_tokens, b.qformer.query_tokens)
    with pytest.raises(Stage1Error, match="qformer"):
        b.load_trainable_state_dict({'vision.x': torch.zeros(1)})
