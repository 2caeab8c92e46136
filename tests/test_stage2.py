"""Stage 2 checks beyond the notebook: batched generation equals one-by-one generation (left
padding is right), stage-1 weights load from a checkpoint folder, the encoder-decoder LLM stays
bit-identical, and bad inputs fail clearly."""
import os
import pytest
import torch
from safetensors.torch import save_file

os.environ.setdefault('HF_HUB_OFFLINE', '1')
os.environ.setdefault('OMP_NUM_THREADS', '1')

from blip2_lab.config import get_preset, apply_overrides
from blip2_lab.stage1 import Blip2Stage1
from blip2_lab.stage2 import Blip2Stage2, Stage2Error, split_prefix


@pytest.fixture(scope='module')
def model():
    torch.manual_seed(0)
    return Blip2Stage2(get_preset('tiny')).eval()


def test_batched_generation_equals_single(model):
    g = torch.Generator().manual_seed(0)
    emb = torch.randn(3, 17, model.vision.width, generator=g)
    prompts = ['Question: what shape? Short answer:', 'a photo of', 'Question: how many red circles are there? Short answer:']
    kw = dict(num_beams=1, max_new_tokens=6, min_new_tokens=1)
    together = model.generate(image_embeds=emb, prompts=prompts, **kw)
    alone = [model.generate(image_embeds=emb[i:i + 1], prompts=[p], **kw)[0] for i, p in enumerate(prompts)]
    assert together == alone
    blind = model.generate(skip_image=True, prompts=prompts, **kw)
    assert blind == [model.generate(skip_image=True, prompts=[p], **kw)[0] for p in prompts]
    assert model.generate(skip_image=True, batch_size=2, **kw) == model.generate(skip_image=True, prompts=['', ''], **kw)


def test_soft_prompt_changes_the_output_distribution(model):
    emb = torch.randn(2, 17, model.vision.width)
    t = model.lm_batch(['a red circle', 'a red circle'])
    from blip2_lab.stage2 import prepend_queries
    with torch.no_grad():
        outs = [model.llm(inputs_embeds=prepend_queries(model.soft_prompt(e[None].expand(2, -1, -1)), model.llm.embed(t['input_ids']),
                                                        t['attention_mask'])[0], attention_mask=None).logits for e in emb]
    assert not torch.allclose(outs[0], outs[1])   # the image reaches the LLM


def test_load_stage1_from_checkpoint_folder(tmp_path, model):
    s1 = Blip2Stage1(get_preset('tiny'), vision=model.vision)
    with torch.no_grad(): s1.qformer.query_tokens.add_(3.)
    save_file({k: v.contiguous() for k, v in s1.trainable_state_dict().items()}, str(tmp_path/'model.safetensors'))
    m = Blip2Stage2(get_preset('tiny'), vision=model.vision, llm=model.llm)
    loaded = m.load_stage1(tmp_path)
    assert 'qformer.query_tokens' in loaded and torch.equal(m.qformer.query_tokens, s1.qformer.query_tokens)
    other = Blip2Stage1(apply_overrides(get_preset('tiny'), ['qformer.num_query_tokens=4']), vision=model.vision)
    with pytest.raises(Stage2Error, match='configs differ'):
        m.load_stage1(other.trainable_state_dict())


def test_encoder_decoder_llm_frozen_and_prefix_split():
    cfg = apply_overrides(get_preset('tiny'), ['llm.model=tiny-random-t5', 'llm.kind=encoder-decoder'])
    m = Blip2Stage2(cfg).train()
    before = {k: v.clone() for k, v in m.llm.state_dict().items()}
    opt = torch.optim.AdamW(m.trainable_parameters(), lr=1e-3)
    batch = dict(image_embeds=torch.randn(2, 17, m.vision.width), text=['a red circle left of a square', 'two blue stars'])
    for _ in range(2):
        opt.zero_grad(); m(batch)['loss'].backward(); opt.step()
    assert all(torch.equal(before[k], v) for k, v in m.llm.state_dict().items())
    # 'random' splits come from the model's generator: reseeding repeats them
    m.set_generator(torch.Generator().manual_seed(1)); a = m.lm_batch(batch['text'])
    m.set_generator(torch.Generator().manual_seed(1)); b = m.lm_batch(batch['text'])
    assert torch.equal(a['labels'], b['labels']) and torch.equal(a['input_ids'], b['input_ids'])
    assert split_prefix('  ', 'half') == ('', '')


def test_bad_inputs(model):
    with pytest.raises(Stage2Error, match="neither 'pixel_values' nor 'image_embeds'"):
        model(dict(text=['a']))
    with pytest.raises(Stage2Error, match='one caption per image'):
        model(dict(image_embeds=torch.randn(2, 17, model.vision.width), text=['a']))
    with pytest.raises(Stage2Error, match='llm.kind'):
        Blip2Stage2(apply_overrides(get_preset('tiny'), ['llm.kind=encoder-decoder']), vision=model.vision, llm=model.llm)


# --- 2 gloo processes x B == 1 process x 2B (prefix splits drawn for all rows, token means over all processes)
import socket, tempfile
import torch.distributed as dist
import torch.multiprocessing as mp

TEXTS = ['a red circle left of a blue square', 'two stars', 'a green star above a red circle and a cross',
         'a yellow triangle', 'one red square right of a circle', 'blue', 'three shapes in a row', 'a small red star']


def _cfg(kind):
    o = ['qformer.hidden_dropout_prob=0', 'qformer.attention_probs_dropout_prob=0']
    if kind == 't5': o += ['llm.model=tiny-random-t5', 'llm.kind=encoder-decoder', 'llm.prefix_split=random']
    return apply_overrides(get_preset('tiny'), o)


def _step(kind, lo, hi):
    torch.manual_seed(0)
    m = Blip2Stage2(_cfg(kind)).eval()
    emb = torch.randn(8, 17, m.vision.width, generator=torch.Generator().manual_seed(3))
    loss = m(dict(image_embeds=emb[lo:hi], text=TEXTS[lo:hi]))['loss']
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}


def _worker(rank, world, port, path):
    import os
    os.environ.update(MASTER_ADDR='127.0.0.1', MASTER_PORT=str(port))
    dist.init_process_group('gloo', rank=rank, world_size=world)
    try:
        res = {}
        for kind in ('opt', 't5'):
            loss, grads = _step(kind, rank * 4, rank * 4 + 4)
            dist.all_reduce(loss); res[kind + '_loss'] = loss / world
            for g in grads.values(): dist.all_reduce(g); g /= world
            res[kind + '_grads'] = grads
        torch.save(res, f'{path}/rank{rank}.pt')
        dist.barrier()   # no rank tears gloo down while another still talks to it (rank 0 once aborted: 'terminate called')
    finally:
        dist.destroy_process_group()


def test_two_procs_equal_one():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0)); port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as d:
        mp.start_processes(_worker, args=(2, port, d), nprocs=2, join=True, start_method='spawn')
        res = torch.load(f'{d}/rank0.pt', weights_only=False)
    for kind in ('opt', 't5'):
        loss, grads = _step(kind, 0, 8)
        assert torch.allclose(res[kind + '_loss'], loss, atol=1e-5), (kind, res[kind + '_loss'], loss)
        assert grads.keys() == res[kind + '_grads'].keys()
        worst = max((res[kind + '_grads'][n] - g).abs().max().item() for n, g in grads.items())
        assert worst < 1e-5, (kind, worst)
