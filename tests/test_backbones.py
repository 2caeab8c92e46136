"""The shipped backbones in data/backbones: intact, loadable by the lab preset, frozen, and as good as their manifests say."""
import os
os.environ.setdefault('HF_HUB_OFFLINE', '1')
import json
import pytest
import torch
from torch import nn
from blip2_lab.config import get_preset, repo_root, LLMConfig
from blip2_lab.backbones import load_llm, load_vision_encoder, FrozenLLM, FrozenVisionEncoder
from blip2_lab.pretrain import (BACKBONES, FOLDERS, WEIGHT_FILES, verify_backbones, load_manifest, backbones_dir,
                                qa_accuracy, WordTokenizer, clip_retrieval, PretrainError)
from blip2_lab.backbones import build_open_clip

ROOT = backbones_dir()


def test_manifests_match_weights():
    assert verify_backbones() == {k: True for k in BACKBONES}


def test_tampered_weights_are_detected(tmp_path):
    import shutil
    shutil.copytree(ROOT/FOLDERS['vit'], tmp_path/FOLDERS['vit'])
    f = tmp_path/FOLDERS['vit']/WEIGHT_FILES['vit']
    b = bytearray(f.read_bytes()); b[-1] ^= 1; f.write_bytes(bytes(b))
    with pytest.raises(PretrainError, match='sha256'): verify_backbones(tmp_path, models=['vit'])
    with pytest.raises(PretrainError, match='pretrain-backbones'): verify_backbones(tmp_path, models=['opt'])


def test_total_size_under_40mb():
    total = sum(p.stat().st_size for p in ROOT.rglob('*') if p.is_file())
    assert total < 40 * 2**20, total


def _meets_the_bar(name):
    q = load_manifest(name)['quality']
    assert q['val_qa_with_caption']['accuracy'] >= 0.90, (name, q)
    assert q['val_qa_blind']['accuracy'] < q['val_qa_with_caption']['accuracy'] - 0.2, (name, q)
    assert q['val_qa_with_caption']['n'] >= 2000


def test_manifest_quality_meets_the_bar():
    _meets_the_bar('opt')
    _meets_the_bar('t5')
    v = load_manifest('vit')['quality']
    assert v['i2t_r1'] >= 0.30 and v['n_images'] == 1000, v
    for name in BACKBONES:
        m = load_manifest(name)
        assert m['command'].startswith('blip2-lab pretrain-backbones') and m['train_seconds'] > 0


def test_lab_preset_loads_the_shipped_vit_fp32():
    cfg = get_preset('lab')
    enc = load_vision_encoder(cfg.vision)
    x = torch.randn(2, 3, cfg.vision.image_size, cfg.vision.image_size)
    f = enc(x)
    assert f.shape == (2, 65, cfg.vision.width) and f.dtype == torch.float32
    assert enc.grid == (8, 8) and not enc.training
    rand = load_vision_encoder(type(cfg.vision)(**{**cfg.vision.__dict__, 'pretrained': ''}))
    assert (rand(x) - f).abs().max() > 1e-2   # the shipped weights were really loaded


def test_lab_preset_loads_the_shipped_llms_fp32_and_frozen():
    from transformers import AutoTokenizer
    for kind, name in (('decoder', 'opt'), ('encoder-decoder', 't5')):
        llm = load_llm(LLMConfig(kind=kind, model=f'data/backbones/{FOLDERS[name]}'))
        assert llm.kind == kind and llm.dtype == torch.float32
        assert not any(p.requires_grad for p in llm.parameters())
        assert len(AutoTokenizer.from_pretrained(ROOT/FOLDERS[name])) == llm.model.config.vocab_size
    assert load_llm(get_preset('lab').llm).kind == 'decoder'   # the lab preset's LLM is the OPT


def test_shipped_llms_answer_from_the_caption():
    "Both shipped LLMs answer at least 80% of the questions about 12 val images from the caption (OPT 89.5%, blind 5.3%; T5 85.7%, blind 33.8%; 133 questions), and fewer blind."
    from blip2_lab.data import make_records
    cfg = get_preset('lab')
    recs = make_records(cfg.data, 'val', 12)
    items = [(r['captions'][0], q['question'], q['answers'], q['skill']) for r in recs for q in r['questions']]
    for name, kind in (('opt', 'decoder'), ('t5', 'encoder-decoder')):
        llm = load_llm(LLMConfig(kind=kind, model=f'data/backbones/{FOLDERS[name]}'))
        seen = qa_accuracy(llm, items)['accuracy']
        blind = qa_accuracy(llm, items, with_context=False)['accuracy']
        assert seen >= 0.8 and blind < seen, (name, seen, blind)


def test_shipped_opt_reads_a_caption_before_its_bos():
    "The soft prompt's slot: the OPT answers from a caption that comes before <s> (the two-part lines of 02a), and says so in its manifest."
    from blip2_lab.data import make_records
    cfg = get_preset('lab')
    recs = make_records(cfg.data, 'val', 12)
    items = [(r['captions'][0], q['question'], q['answers'], q['skill']) for r in recs for q in r['questions']]
    llm = load_llm(cfg.llm)
    after = qa_accuracy(llm, items, sep=llm.tokenizer.bos_token)['accuracy']
    blind = qa_accuracy(llm, items, with_context=False)['accuracy']
    assert after >= 0.7 and after > blind + 0.2, (after, blind)
    m = load_manifest('opt')
    assert m['doc_frac'] > 0 and m['quality']['val_qa_after_separator']['n'] >= 2000, m


def test_bert_matches_the_lab_qformer():
    from transformers import BertModel, AutoTokenizer
    q = get_preset('lab').qformer
    b = BertModel.from_pretrained(repo_root()/q.bert, dtype=torch.float32)
    c = b.config
    assert (c.hidden_size, c.num_hidden_layers, c.num_attention_heads, c.intermediate_size) == \
           (q.hidden_size, q.num_hidden_layers, q.num_attention_heads, q.intermediate_size)
    assert c.vocab_size == len(AutoTokenizer.from_pretrained(repo_root()/q.bert))
    # the lab's Q-Former reads a ShapesWorld-sized subset of BERT's vocabulary (+ [DEC]): every token has its BERT row
    from blip2_lab.bert import load_qformer_tokenizer, vocab_row_map
    small = load_qformer_tokenizer(repo_root()/q.tokenizer)
    rows = vocab_row_map(small, repo_root()/q.bert)
    assert len(small) == q.vocab_size < c.vocab_size and rows is not None
    assert (rows >= 0).sum() == q.vocab_size - 1 and rows[small.bos_token_id] == -1   # all but [DEC]
    assert b.embeddings.word_embeddings.weight.dtype == torch.float32


def test_frozen_llm_inside_a_training_step():
    llm = load_llm(get_preset('lab').llm)
    proj = nn.Linear(8, llm.hidden_size)
    parent = nn.ModuleDict(dict(llm=llm, proj=proj)).train()
    assert not llm.training
    before = {k: v.clone() for k, v in llm.state_dict().items()}
    ids = llm.tokenizer(llm.with_eos(['a red circle']), return_tensors='pt').input_ids
    soft = proj(torch.randn(1, 4, 8))
    emb = torch.cat([soft, llm.embed(ids)], 1)
    labels = torch.cat([torch.full((1, 4), -100), ids], 1)
    opt = torch.optim.AdamW([p for p in parent.parameters() if p.requires_grad], lr=1e-2)
    llm(inputs_embeds=emb, labels=labels).loss.backward(); opt.step()
    assert proj.weight.grad is not None
    assert all(torch.equal(before[k], v) for k, v in llm.state_dict().items())


def test_shipped_clip_retrieves_val_images():   # the ViT meets its bar: enforced
    import numpy as np
    from blip2_lab.data import make_records, render_scene
    cfg = get_preset('lab')
    n = 200
    recs = make_records(cfg.data, 'val', n)       # the val split's first images, rendered here (no full build needed)
    imgs = torch.from_numpy(np.stack([render_scene(r['meta']['scene'], cfg.data.image_size) for r in recs]))
    f = ROOT/FOLDERS['vit']
    clip = build_open_clip(cfg.vision.model, str(f/WEIGHT_FILES['vit'])).eval()
    tok = WordTokenizer.from_json(json.loads((f/'text_vocab.json').read_text()))
    q = clip_retrieval(clip, tok, imgs, [r['captions'] for r in recs])
    assert q['i2t_r1'] >= 0.3, q
