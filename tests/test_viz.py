"""blip2_lab.viz beyond the notebook: the explorers' widget logic without a frontend (ipywidgets 8 falls back to a
DummyComm: observe and on_click still fire), and the views on the real model classes: a tiny Blip2Stage2, a tiny
trained lab checkpoint, and tiny Hugging Face BLIP-2 folders (retrieval and generation)."""
from __future__ import annotations
import os
os.environ.setdefault('HF_HUB_OFFLINE', '1'); os.environ.setdefault('MPLBACKEND', 'Agg')
import numpy as np
import pytest
import torch

from blip2_lab import viz
from blip2_lab.config import Blip2LabError, get_preset


def synthetic_attention(i, H=2, Q=3, g=3):
    "Image i: query q puts 0.6 on patch (q + i) of a g x g grid and 0.4 on the CLS key."
    a = torch.zeros(1, H, Q, 1 + g * g); a[..., 0] = 0.4
    for q in range(Q): a[0, :, q, 1 + (q + i) % (g * g)] = 0.6
    return [a, None, a.clone()]          # cross-attention in layers 0 and 2 (cross_attention_freq=2)


def test_widgets_use_dummy_comm_and_observe_fires():
    ex = viz.AttentionExplorer([torch.zeros(3, 24, 24)] * 2, synthetic_attention, labels=['a', 'b'])
    assert type(ex.image.comm).__name__ == 'DummyComm'       # no kernel, no frontend
    assert [v for _, v in ex.layer.options] == [0, 2]         # layer 1 has no cross-attention: not offered
    seen = []
    ex.query.observe(lambda ch: seen.append(ch['new']), names='value')
    v0 = ex.view.value
    ex.query.value = 1
    assert seen == [1] and ex.view.value != v0
    assert 'row 0, col 1' in ex.status.value and 'CLS key: 40.0%' in ex.status.value
    ex.image.value = 1                                        # query 1 of image 1 looks at patch 2 -> (0, 2)
    assert 'row 0, col 2' in ex.status.value
    ex.layer.value = 2; ex.head.value = 1; ex.alpha.value = 0.2
    fig = ex.figure()
    assert len(fig.axes[1].images) == 2 and fig.axes[1].images[1].get_alpha() == 0.2
    ex.query.value = -1                                       # all queries, then their mean
    assert len([a for a in ex.figure().axes if a.images]) == 1 + 3 + 1


def test_attribution_explorer_click_and_error():
    calls = []
    def fn(i, text):
        calls.append((i, text))
        if text == 'bad': raise viz.VizError('texts must be non-empty strings')
        return torch.arange(9.).reshape(3, 3), torch.tensor([1., -1.]), text
    ax = viz.AttributionExplorer([torch.zeros(3, 24, 24)], fn, texts=['a red circle', 'bad'])
    clicks = []
    ax.button.on_click(lambda b: clicks.append(b))
    ax.button.click()
    assert calls == [(0, 'a red circle')] and len(clicks) == 1 and ax.view.value[:4] == b'\x89PNG'
    good = ax.view.value
    ax.text.value = 'bad'; ax.button.click()                  # a Blip2LabError is shown, not raised into the event loop
    assert 'error' in ax.status.value and 'non-empty' in ax.status.value and ax.view.value == good


def test_view_explorer_redraws_on_change_and_button():
    me = viz.mask_explorer(num_query=3, text_len=4, pad=0)
    fired = []
    me.controls['num_query'].observe(lambda ch: fired.append(ch['new']), names='value')
    png = me.view.value
    me.controls['num_query'].value = 5
    assert fired == [5] and me.view.value != png and me.status.value == ''
    draws = []
    ve = viz.ViewExplorer(lambda n: draws.append(n) or viz.plot_masks(viz.attention_masks(n, 3, 0), n),
                          {'n': me.controls['text_len']}, button='Draw')
    assert draws == [] and ve.view.value == b''          # with a button, nothing is drawn until it is pressed
    ve.button.click()
    assert draws == [4] and ve.view.value[:4] == b'\x89PNG'


def test_bad_inputs_name_the_fix():
    with pytest.raises(Blip2LabError, match='no cross-attention'): viz.pick_attention(synthetic_attention(0), 1)
    with pytest.raises(Blip2LabError, match='n_prefix=0'): viz.attention_grid(torch.ones(9))
    with pytest.raises(Blip2LabError, match='at least one image'): viz.AttentionExplorer([], synthetic_attention)
    with pytest.raises(Blip2LabError, match='eager'): viz.visual_prompt_share([None], 2)


@pytest.fixture(scope='module')
def stage2():
    from blip2_lab.checkpoint import build_model
    torch.manual_seed(0)
    return build_model(get_preset('tiny'), 2, seed=0).eval()


def _images(cfg, n=2):
    from PIL import Image
    from blip2_lab.data import make_records, render_scene, image_transform
    tf = image_transform(cfg.data.image_size, train=False)
    return [tf(Image.fromarray(render_scene(r['meta']['scene'], cfg.data.image_size))) for r in make_records(cfg.data, 'test', n)]


def test_views_on_blip2_stage2(stage2):
    cfg = get_preset('tiny')
    vm = viz.as_viz_model(stage2)
    assert vm.qformer is stage2.qformer and vm.vision is stage2.vision and vm.llm is stage2.llm and vm.llm_proj is stage2.llm_proj
    imgs = _images(cfg)
    ca = viz.query_cross_attention(stage2, imgs)
    assert sorted(ca) == [0] and ca[0].shape == (2, 4, 8, 17)
    # the step-by-step loop writes what the model's own greedy generate writes, from the same inputs
    steps = viz.generation_steps(stage2, imgs[0], prompt='a photo of', max_new_tokens=5)
    text = stage2.generate(pixel_values=imgs[0][None], prompts=['a photo of'], num_beams=1, max_new_tokens=5, min_new_tokens=1)[0]
    ids = [s['id'] for s in steps if s['id'] != stage2.llm.eos_token_id]
    assert stage2.llm.tokenizer.decode(ids, skip_special_tokens=True).strip() == text
    a = viz.answer_attribution(stage2, imgs[0], 'a photo of', 'a circle', n_steps=16)
    assert abs(float(a.query.sum()) - (a.score - a.baseline)) < 0.05 * abs(a.score - a.baseline) + 1e-3
    assert a.patch.shape == (4, 4)
    assert stage2.training is False and stage2.qformer.training is False


def test_generation_steps_on_an_encoder_decoder_llm():
    "With a T5-style LLM (llm.kind=encoder-decoder, the lab's t5-lab), the encoder and decoder stacks must switch to eager attention too."
    from blip2_lab.checkpoint import build_model
    from blip2_lab.config import apply_overrides
    cfg = apply_overrides(get_preset('tiny'), ['llm.kind=encoder-decoder', 'llm.model=tiny-random-t5'])
    torch.manual_seed(0)
    m = build_model(cfg, 2, seed=0).eval()
    impl = lambda: [x.config._attn_implementation for x in m.llm.model.modules() if hasattr(x, 'set_attn_implementation')]
    before = impl()
    steps = viz.generation_steps(m, _images(cfg, 1)[0], prompt='Question: what colour? Short answer:', max_new_tokens=3)
    assert steps and all(0 < s['visual_share'] <= 1 for s in steps)
    assert impl() == before and len(before) == 3    # T5ForConditionalGeneration + its two stacks, restored after


def test_trained_lab_checkpoint(tmp_path):
    "A checkpoint folder written by the trainer opens with load_viz_model, and the views run on it."
    from blip2_lab.train import train
    out = train(get_preset('tiny'), 1, tmp_path / 's1', progress=False)
    vm = viz.load_viz_model(out)
    imgs = _images(get_preset('tiny'), 1)
    fig = viz.plot_query_attention(vm, imgs[0], layer=0)
    assert len([a for a in fig.axes if a.images]) == 1 + vm.qformer.num_query + 1
    sim = viz.itc_query_similarity(vm, imgs[0], ['a red circle', 'a blue square'])
    assert sim.shape == (vm.qformer.num_query, 2)
    with pytest.raises(Blip2LabError, match='stage-1 model'): viz.generation_steps(vm, imgs[0])
    with pytest.raises(Blip2LabError, match='does not exist'): viz.load_viz_model(tmp_path / 'nope')


def _word_tokenizer(kind: str, words):
    "A whitespace word-level fast tokenizer: BERT-like with [DEC] for the Q-Former, OPT-like (<s> first) for the LLM."
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast
    specials = ['[PAD]', '[UNK]', '[CLS]', '[SEP]', '[DEC]'] if kind == 'bert' else ['<pad>', '</s>', '<unk>', '<s>']
    tk = Tokenizer(models.WordLevel({w: i for i, w in enumerate(specials + words)}, unk_token=specials[1] if kind == 'bert' else '<unk>'))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    if kind == 'bert':
        tk.post_processor = processors.TemplateProcessing(single='[CLS] $A [SEP]', special_tokens=[('[CLS]', 2), ('[SEP]', 3)])
        return PreTrainedTokenizerFast(tokenizer_object=tk, pad_token='[PAD]', unk_token='[UNK]', cls_token='[CLS]', sep_token='[SEP]', bos_token='[DEC]')
    tk.post_processor = processors.TemplateProcessing(single='<s> $A', special_tokens=[('<s>', 3)])
    return PreTrainedTokenizerFast(tokenizer_object=tk, pad_token='<pad>', eos_token='</s>', unk_token='<unk>', bos_token='<s>')


def test_hugging_face_blip2_folders(tmp_path):
    "Weights saved by transformers (Blip2ForImageTextRetrieval / Blip2ForConditionalGeneration) open with load_viz_model."
    from blip2_lab.interop import tiny_hf_blip2
    words = 'a the photo of red blue green circle square cross small large left right top bottom'.split()
    ret, gen = tmp_path / 'ret', tmp_path / 'gen'
    tiny_hf_blip2('retrieval').save_pretrained(ret); _word_tokenizer('bert', words).save_pretrained(ret)
    tiny_hf_blip2('generation').save_pretrained(gen); _word_tokenizer('opt', words).save_pretrained(gen)
    img = torch.randn(3, 28, 28)
    vr = viz.load_viz_model(ret)
    assert vr.grid == (2, 2) and vr.llm is None
    ca = viz.query_cross_attention(vr, img)
    assert sorted(ca) == [0, 2] and ca[0].shape == (1, 4, 8, 1 + 4)      # 3 layers, cross-attention every 2nd
    assert viz.itc_query_similarity(vr, img, ['a red circle', 'a blue square']).shape == (8, 2)
    at = viz.itm_attribution(vr, img, 'a red circle', n_steps=16)
    # completeness: patches + CLS account for score - baseline up to captum's own convergence error
    # (random vision weights put ln_vision's jump near the all-zero baseline, so that error is not small here)
    gap = abs(float(at.patch.sum()) + at.cls - (at.score - at.baseline))
    assert abs(gap - at.delta) < 1e-3
    vg = viz.load_viz_model(gen)
    assert vg.llm is not None and vg.llm_proj is not None and vg.tokenizer is None
    steps = viz.generation_steps(vg, img, prompt='a photo of', max_new_tokens=3)
    assert 1 <= len(steps) <= 3 and all(0 <= s['visual_share'] <= 1 for s in steps)
    with pytest.raises(Blip2LabError, match='no Q-Former tokenizer'): viz.itc_query_similarity(vg, img, ['a red circle'])
