"""Parity of blip2_lab's Q-Former with transformers' BLIP-2 (fp32, 1e-5) over several configurations.

Each test builds a tiny random transformers model, saves it with save_pretrained, loads it with
`blip2_lab.interop.load_blip2` and compares query outputs, ITC similarities and ITM logits; then
writes our weights back into a fresh transformers model and compares again.
"""
import os
os.environ.setdefault('HF_HUB_OFFLINE', '1')
import pytest
import torch
from blip2_lab.interop import load_blip2, to_hf_state_dict, tiny_hf_blip2, hf_raw_features

TOL = 1e-5
# (layers, cross_attention_freq, queries, hidden, vision width): odd and even depths, freq 1/2/3, 8 and 32 queries
CONFIGS = [(1, 1, 8, 32, 24), (2, 2, 32, 32, 48), (3, 3, 8, 64, 40), (4, 2, 32, 32, 24), (5, 3, 8, 32, 64)]


def _inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    px = torch.randn(3, 3, 28, 28, generator=g)
    ids = torch.randint(1, 120, (4, 7), generator=g); ids[:, 0] = 101
    am = torch.ones_like(ids); am[2, 5:] = 0; am[3, 2:] = 0
    return px, ids, am


def _compare(hf, ours, px, ids, am):
    "Max abs differences (query outputs, ITC, ITM) between the HF retrieval model and ours."
    raw = hf_raw_features(hf, px)
    with torch.no_grad():
        hq = hf.qformer(query_embeds=hf.query_tokens.expand(px.shape[0], -1, -1),
                        encoder_hidden_states=hf.vision_model.post_layernorm(raw)).last_hidden_state
        q = (ours.image_forward(raw).query_output - hq).abs().max().item()
        itc_hf = hf(pixel_values=px, input_ids=ids, attention_mask=am).logits_per_image
        sim = torch.einsum('bqe,te->bqt', ours.image_feats(raw), ours.text_feat(ids, am)).amax(1)
        itc = (sim - itc_hf).abs().max().item()
        n = px.shape[0]
        itm_hf = hf(pixel_values=px, input_ids=ids[:n], attention_mask=am[:n], use_image_text_matching_head=True).logits_per_image
        itm = (ours.itm_logits(raw, ids[:n], am[:n]) - itm_hf).abs().max().item()
    return q, itc, itm


@pytest.mark.parametrize('layers,freq,nq,hidden,vw', CONFIGS)
def test_retrieval_parity(tmp_path, layers, freq, nq, hidden, vw):
    hf = tiny_hf_blip2('retrieval', num_layers=layers, cross_attention_freq=freq, num_query=nq, hidden=hidden, vision_width=vw)
    hf.save_pretrained(tmp_path)
    ck = load_blip2(tmp_path)
    ours = ck.model
    assert sum(l.cross_attn is not None for l in ours.qformer.layer) == len(range(0, layers, freq))
    assert set(ck.report['left']) == {'temp', 'lm_head.bias', 'lm_head.dense.weight', 'lm_head.dense.bias',
                                      'lm_head.norm.weight', 'lm_head.norm.bias'}
    px, ids, am = _inputs()
    q, itc, itm = _compare(hf, ours, px, ids, am)
    assert q < TOL and itc < TOL and itm < TOL, (q, itc, itm)
    # and back: our weights in a fresh HF model reproduce the same outputs
    hf2 = tiny_hf_blip2('retrieval', num_layers=layers, cross_attention_freq=freq, num_query=nq, hidden=hidden,
                        vision_width=vw, seed=1)
    missing, unexpected = hf2.load_state_dict(to_hf_state_dict(ours, 'retrieval'), strict=False)
    assert not unexpected and all(k.startswith('vision_model.') for k in missing)
    hf2.vision_model.load_state_dict(hf.vision_model.state_dict())
    assert max(_compare(hf2, ours, px, ids, am)) < TOL


def test_parity_detects_a_wrong_weight(tmp_path):
    "Negative control: one perturbed cross-attention weight in the last cross-attention layer breaks parity."
    hf = tiny_hf_blip2('retrieval', num_layers=3, cross_attention_freq=2)
    hf.save_pretrained(tmp_path)
    ours = load_blip2(tmp_path).model
    with torch.no_grad(): ours.qformer.layer[2].cross_attn.value.weight[0, 0] += 1e-2
    q, itc, itm = _compare(hf, ours, *_inputs())
    assert q > TOL and itm > TOL


def test_bare_qformer_state_dict(tmp_path):
    "A bare Blip2QFormerModel state dict loads into ours and gives the same query outputs."
    from blip2_lab.interop import from_hf_state_dict, hf_qformer_config
    from blip2_lab.qformer import Blip2QFormer
    from blip2_lab.config import QFormerConfig
    from transformers import Blip2QFormerModel
    cfg = QFormerConfig(num_query_tokens=8, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                        intermediate_size=48, cross_attention_freq=2, vocab_size=120, max_position_embeddings=40)
    torch.manual_seed(0)
    hq = Blip2QFormerModel(hf_qformer_config(cfg, 24)).eval()
    with torch.no_grad():
        for p in hq.parameters(): p.add_(torch.randn_like(p) * 0.3)
    ours = Blip2QFormer(cfg, 24).eval()
    rep = from_hf_state_dict(ours, hq.state_dict())
    assert 'query_tokens' in rep['left'] and 'ln_vision.weight' in rep['left'] and not rep['ignored']
    with torch.no_grad():
        ours.ln_vision.weight.fill_(1.0); ours.ln_vision.bias.zero_()
        x = torch.randn(2, 5, 24)
        theirs = hq(query_embeds=ours.query_tokens.expand(2, -1, -1), encoder_hidden_states=ours.ln_vision(x)).last_hidden_state
        assert (ours.image_forward(x).query_output - theirs).abs().max() < TOL
    assert set(to_hf_state_dict(ours, 'qformer')) == set(hq.state_dict())


@pytest.mark.parametrize('layers,freq', [(2, 1), (3, 2)])
def test_generation_parity(tmp_path, layers, freq):
    "Blip2ForConditionalGeneration: the projected query outputs (the LLM's soft prompt) agree."
    hf = tiny_hf_blip2('generation', num_layers=layers, cross_attention_freq=freq, num_query=32)
    hf.save_pretrained(tmp_path)
    ck = load_blip2(tmp_path)
    px = _inputs()[0]
    raw = hf_raw_features(hf, px)
    with torch.no_grad():
        theirs = hf.get_image_features(pixel_values=px).pooler_output
        ours = ck.language_projection(ck.model.image_forward(raw).query_output)
    assert (ours - theirs).abs().max() < TOL
    sd = to_hf_state_dict(ck.model, 'generation', ck.language_projection)
    ref = hf.state_dict()
    assert all(torch.equal(v, ref[k]) for k, v in sd.items())
    assert not any(k.startswith('embeddings.') or '.intermediate.' in k for k in sd)
