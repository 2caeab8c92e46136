"""Parity of blip2_lab's Q-Former with transformers' BLIP-2 (fp32) over several configurations.

Each test builds a tiny transformers model with every weight randomised (`tiny_hf_blip2`: the vision
tower too, so that every image gives different features), saves it with save_pretrained, loads it
with `blip2_lab.interop.load_blip2` and compares query outputs, ITC similarities and ITM logits
(`retrieval_parity`: max difference relative to the output's scale, at most PARITY_RTOL = 1e-4);
then writes our weights back into a fresh transformers model and compares again. Negative
controls check that a one-line mapping bug fails the same check.
"""
import os
os.environ.setdefault('HF_HUB_OFFLINE', '1')
import pytest
import torch
from blip2_lab import interop
from blip2_lab.interop import (load_blip2, to_hf_state_dict, tiny_hf_blip2, hf_raw_features,
                               retrieval_parity, rel_diff, PARITY_RTOL)

# (layers, cross_attention_freq, queries, hidden, vision width): odd and even depths, freq 1/2/3, 8 and 32 queries
CONFIGS = [(1, 1, 8, 32, 24), (2, 2, 32, 32, 48), (3, 3, 8, 64, 40), (4, 2, 32, 32, 24), (5, 3, 8, 32, 64)]
LEFT = {'temp', 'lm_head.bias', 'lm_head.dense.weight', 'lm_head.dense.bias', 'lm_head.norm.weight',
        'lm_head.norm.bias'}   # what HF has no place for: left as initialised


def _inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    px = torch.randn(3, 3, 28, 28, generator=g)
    ids = torch.randint(1, 120, (4, 7), generator=g); ids[:, 0] = 101
    am = torch.ones_like(ids); am[2, 5:] = 0; am[3, 2:] = 0
    return px, ids, am


def _assert_parity(hf, ours, inputs):
    "AssertionError unless query outputs, ITC and ITM agree to PARITY_RTOL of their scale."
    diffs = retrieval_parity(hf, ours, *inputs)
    assert max(diffs.values()) < PARITY_RTOL, diffs


def test_tiny_model_has_every_weight_random():
    "No weight of the test model is left constant (ones, zeros) or at a near-zero initialisation."
    hf = tiny_hf_blip2('retrieval')
    for name, p in hf.named_parameters():
        assert p.std() > 0.02, name                    # none constant (ones, zeros), none near zero
    raw = hf_raw_features(hf, _inputs()[0])
    assert (raw[0] - raw[1]).abs().max() > 0.1 * raw.abs().max()   # images give different features


@pytest.mark.parametrize('layers,freq,nq,hidden,vw', CONFIGS)
def test_retrieval_parity(tmp_path, layers, freq, nq, hidden, vw):
    hf = tiny_hf_blip2('retrieval', num_layers=layers, cross_attention_freq=freq, num_query=nq, hidden=hidden, vision_width=vw)
    hf.save_pretrained(tmp_path)
    ck = load_blip2(tmp_path)
    ours = ck.model
    assert sum(l.cross_attn is not None for l in ours.qformer.layer) == len(range(0, layers, freq))
    assert set(ck.report['left']) == LEFT
    _assert_parity(hf, ours, _inputs())
    # and back: our weights in a fresh HF model reproduce the same outputs
    hf2 = tiny_hf_blip2('retrieval', num_layers=layers, cross_attention_freq=freq, num_query=nq, hidden=hidden,
                        vision_width=vw, seed=1)
    missing, unexpected = hf2.load_state_dict(to_hf_state_dict(ours, 'retrieval'), strict=False)
    assert not unexpected and all(k.startswith('vision_model.') for k in missing)
    tower = {k: v for k, v in hf.vision_model.state_dict().items() if 'post_layernorm' not in k}
    hf2.vision_model.load_state_dict(tower, strict=False)
    _assert_parity(hf2, ours, _inputs())


def test_parity_detects_a_wrong_weight(tmp_path):
    "Negative control: one perturbed cross-attention weight in the last cross-attention layer breaks parity."
    hf = tiny_hf_blip2('retrieval', num_layers=3, cross_attention_freq=2)
    hf.save_pretrained(tmp_path)
    ours = load_blip2(tmp_path).model
    with torch.no_grad(): ours.qformer.layer[2].cross_attn.value.weight[0, 0] += 1.0
    d = retrieval_parity(hf, ours, *_inputs())
    assert d['query_output'] > PARITY_RTOL and d['itm'] > PARITY_RTOL, d


def _ones_for(target):
    "A conversion bug: `_copy` writes ones into our tensor `target`, not the checkpoint's values."
    real = interop._copy
    def buggy(dst, src, ours, hf):
        real(dst, torch.ones_like(src) if ours == target else src, ours, hf)
    return buggy


def _swapped(a, b):
    "A conversion bug: the name table maps our modules `a` and `b` to each other's HF names."
    real = interop.hf_key_map
    def buggy(*args, **kw):
        m = real(*args, **kw)
        m[a], m[b] = m[b], m[a]
        return m
    return buggy


L0, L1, L2 = 'qformer.layer.0.', 'qformer.layer.1.', 'qformer.layer.2.'
BUGS = {   # name -> (the interop function replaced, its buggy version)
    'ln_vision weight loaded as ones': ('_copy', _ones_for('ln_vision.weight')),
    'Q-Former input LayerNorm as ones': ('_copy', _ones_for('qformer.embeddings.norm.weight')),
    'cross-attention key and value swapped': ('hf_key_map', _swapped(L0 + 'cross_attn.key',
                                                                      L0 + 'cross_attn.value')),
    'self-attention query and key swapped': ('hf_key_map', _swapped(L2 + 'self_attn.query',
                                                                     L2 + 'self_attn.key')),
    'query and text FFN swapped': ('hf_key_map', _swapped(L1 + 'ffn_query.intermediate',
                                                          L1 + 'ffn_text.intermediate')),
}


@pytest.mark.parametrize('bug', list(BUGS))
def test_a_one_line_mapping_bug_fails_parity(tmp_path, monkeypatch, bug):
    "The conversion with one deliberate bug loads without complaint, and the parity check fails."
    hf = tiny_hf_blip2('retrieval', num_layers=3, cross_attention_freq=2)
    hf.save_pretrained(tmp_path)
    _assert_parity(hf, load_blip2(tmp_path).model, _inputs())   # the right conversion passes
    monkeypatch.setattr(interop, *BUGS[bug])
    ck = load_blip2(tmp_path)
    assert set(ck.report['left']) == LEFT                        # the report cannot see the bug
    with pytest.raises(AssertionError):
        _assert_parity(hf, ck.model, _inputs())


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
        for p in hq.parameters(): p.add_(torch.randn_like(p) * 0.5)
    ours = Blip2QFormer(cfg, 24).eval()
    rep = from_hf_state_dict(ours, hq.state_dict())
    assert 'query_tokens' in rep['left'] and 'ln_vision.weight' in rep['left'] and not rep['ignored']
    with torch.no_grad():
        # not in a bare Q-Former, random too
        ours.query_tokens.copy_(torch.randn_like(ours.query_tokens) * 0.5)
        ours.ln_vision.weight.copy_(torch.randn_like(ours.ln_vision.weight) * 0.5 + 1.0)
        ours.ln_vision.bias.copy_(torch.randn_like(ours.ln_vision.bias) * 0.5)
        x = torch.randn(2, 5, 24) * 3
        theirs = hq(query_embeds=ours.query_tokens.expand(2, -1, -1), encoder_hidden_states=ours.ln_vision(x)).last_hidden_state
        assert rel_diff(ours.image_forward(x).query_output, theirs) < PARITY_RTOL
    assert set(to_hf_state_dict(ours, 'qformer')) == set(hq.state_dict())


@pytest.mark.parametrize('layers,freq', [(2, 1), (3, 2)])
def test_generation_parity(tmp_path, layers, freq):
    "Blip2ForConditionalGeneration: the projected query outputs (the LLM's soft prompt) agree."
    hf = tiny_hf_blip2('generation', num_layers=layers, cross_attention_freq=freq, num_query=32)
    hf.save_pretrained(tmp_path)
    ck = load_blip2(tmp_path)
    px = _inputs()[0]
    raw = hf_raw_features(hf, px)
    assert (raw[0] - raw[1]).abs().max() > 0.1 * raw.abs().max()
    with torch.no_grad():
        theirs = hf.get_image_features(pixel_values=px).pooler_output
        ours = ck.language_projection(ck.model.image_forward(raw).query_output)
    assert rel_diff(ours, theirs) < PARITY_RTOL
    sd = to_hf_state_dict(ck.model, 'generation', ck.language_projection)
    ref = hf.state_dict()
    assert all(torch.equal(v, ref[k]) for k, v in sd.items())   # copies, no arithmetic
    assert not any(k.startswith('embeddings.') or '.intermediate.' in k for k in sd)
