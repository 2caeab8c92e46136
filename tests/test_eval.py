"Tests of blip2_lab.evaluate beyond the notebook's own: errors users hit, the CLI, and evaluation of trained and Hugging Face checkpoints."
import json, os
from itertools import combinations
import pytest, torch
from blip2_lab import evaluate as ev
from blip2_lab.cli import main as cli_main


def test_vqa_accuracy_matches_subset_definition():
    "VQAv2 accuracy equals its definition (min(matches/3,1) averaged over the 10 choose 9 subsets) on random answer sets."
    g = torch.Generator().manual_seed(0)
    vocab = ['two', '2', 'Two.', 'three', 'red', 'red.', 'the red', 'no', 'yes']
    for _ in range(200):
        answers = [vocab[int(i)] for i in torch.randint(0, len(vocab), (10,), generator=g)]
        pred = vocab[int(torch.randint(0, len(vocab), (1,), generator=g))]
        p = ev.normalize_answer(pred)
        gts = ev.normalize_human_answers(answers)
        want = sum(min(sum(a == p for a in sub) / 3, 1) for sub in combinations(gts, 9)) / 10
        assert abs(ev.vqa_accuracy(pred, answers) - want) < 1e-12


def test_normalize_answer_cases():
    assert ev.normalize_answer('Three') == '3'
    assert ev.normalize_answer('the cat.') == 'cat'
    assert ev.normalize_answer('isnt') == "isn't"
    assert ev.normalize_answer('two dogs') == '2 dogs'
    assert ev.normalize_answer('10.5') == '10.5'


# (raw prediction, what the official vqaEval.py makes of it), worked out from its code
OFFICIAL_PREDICTIONS = [
    ('dont', "don't"), ('two', '2'), ('a dog.', 'dog'), ('None', '0'), ('an  Apple ', 'apple'),
    ('hed', "he'd"), ('howd', "how'd"), ('itll', "it'll"), ('shant', "shan't"), ('notve', "not've"),
    ('twas', "'twas"), ("somebody'd", 'somebodyd'), ("yall'll", "y'all'll"), ('Im', 'im'),
    ('Ive', 'ive'), ('well', 'well'), ('its', 'its'),
    ('red!blue,!', 'red blue'),          # '!' decided on the input: no space next to it -> a space
    ('b!two,!.two', 'b 2 2'), ('left-side', 'left side'), ('red , blue', 'red blue'),
    ('red-blue 1,000', 'redblue 1000'),  # a comma between digits: every mark deleted
    ('yes.', 'yes'), ('3.5', '3.5'),
]


@pytest.mark.parametrize('raw,want', OFFICIAL_PREDICTIONS)
def test_normalize_answer_as_official(raw, want):
    assert ev.normalize_answer(raw) == want


def test_normalize_answer_removes_at_most_32_periods():
    "The official script passes re.UNICODE (32) as re.sub's count: periods after the 32nd stay."
    assert ev.normalize_answer('x. ' * 40) == ' '.join(['x'] * 32 + ['x.'] * 8)


# (prediction, human answers, official accuracy)
OFFICIAL_ACCURACY = [
    ('2', ['two'] * 10, 0.0),                          # ten equal human answers: compared as given
    ('2', ['two'] * 9 + ['2'], 0.3),                   # differing: punctuation only; one '2' counts
    ('red', ['red.'] * 3 + ['blue'] * 7, 0.9),         # ... but 'red.' loses its period
    ('red', ['Red'] * 5 + ['blue'] * 5, 0.0),          # no lowercasing of human answers
    ('RED', ['red'] * 4 + ['blue'] * 6, 1.0),          # the prediction is lowercased
    ('the dog', ['dog'] * 2 + ['cat'] * 8, 0.6),       # the prediction loses its article
    ('dont', ["don't"] * 3 + ['no'] * 7, 0.9),
]


@pytest.mark.parametrize('pred,answers,want', OFFICIAL_ACCURACY)
def test_vqa_accuracy_as_official(pred, answers, want):
    assert abs(ev.vqa_accuracy(pred, answers) - want) < 1e-12


def test_recall_batched_equals_bruteforce_large():
    "Ranks from the vectorised code equal a per-row Python sort on a bigger random set with ties."
    g = torch.Generator().manual_seed(1)
    n_img, cpi = 40, 5
    img2txt = [list(range(i * cpi, (i + 1) * cpi)) for i in range(n_img)]
    txt2img = [t // cpi for t in range(n_img * cpi)]
    s = torch.randint(0, 20, (n_img, n_img * cpi), generator=g).float()
    ri, rt = ev.retrieval_ranks(s, s.t().contiguous(), img2txt, txt2img)
    for i in range(n_img):
        order = sorted(range(n_img * cpi), key=lambda c: (-float(s[i, c]), c))
        assert int(ri[i]) == min(order.index(t) for t in img2txt[i])
    for t in range(n_img * cpi):
        order = sorted(range(n_img), key=lambda c: (-float(s[c, t]), c))
        assert int(rt[t]) == order.index(txt2img[t])


def test_caption_metrics_without_java(monkeypatch):
    monkeypatch.setenv('PATH', '/nonexistent')
    with pytest.raises(ev.EvalError, match='need Java'):
        ev.caption_metrics({'a': 'x'}, {'a': ['x']})


def test_cli_errors(tmp_path, capsys):
    assert cli_main(['eval', '--ckpt', str(tmp_path/'nope')]) == 2
    assert 'does not exist' in capsys.readouterr().err
    with pytest.raises(ev.EvalError, match='choose test, ood'):
        ev._splits('tset')
    with pytest.raises(ev.EvalError, match='unknown task'):
        ev._tasks('retrieval,captions')


def _word_tokenizer(words, kind):
    "A tiny word-level fast tokenizer: BERT-like ([CLS] ... [SEP], bos [DEC]) for the Q-Former, OPT-like (</s> first) for the LLM."
    from tokenizers import Tokenizer, models, pre_tokenizers, processors, normalizers
    from transformers import PreTrainedTokenizerFast
    if kind == 'bert':
        specials = ['[PAD]', '[UNK]', '[CLS]', '[SEP]', '[MASK]', '[DEC]']
    else:
        specials = ['<s>', '<pad>', '</s>', '<unk>']
    vocab = {w: i for i, w in enumerate(specials + list(words))}
    tk = Tokenizer(models.WordLevel(vocab, unk_token='[UNK]' if kind == 'bert' else '<unk>'))
    tk.normalizer = normalizers.Lowercase()
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    if kind == 'bert':
        tk.post_processor = processors.TemplateProcessing(single='[CLS] $A [SEP]', special_tokens=[('[CLS]', 2), ('[SEP]', 3)])
        return PreTrainedTokenizerFast(tokenizer_object=tk, pad_token='[PAD]', unk_token='[UNK]', cls_token='[CLS]',
                                       sep_token='[SEP]', mask_token='[MASK]', bos_token='[DEC]')
    tk.post_processor = processors.TemplateProcessing(single='</s> $A', special_tokens=[('</s>', 2)])
    return PreTrainedTokenizerFast(tokenizer_object=tk, pad_token='<pad>', unk_token='<unk>', bos_token='</s>', eos_token='</s>')


def _tiny_words(cfg, n):
    from blip2_lab.data import get_dataset
    from collections import Counter
    ds = get_dataset(cfg.data, 'train')
    c = Counter(w for i in range(len(ds)) for t in ds.captions(i) + [q.question for q in ds.questions(i)] + [q.answers[0] for q in ds.questions(i)]
                for w in t.lower().replace('?', ' ').replace('.', ' ').replace(',', ' ').split())
    return [w for w, _ in c.most_common(n)] + [':', '?', 'question', 'short', 'answer']


def test_evaluate_hf_blip2_folders(tmp_path):
    "evaluate() runs unchanged on transformers BLIP-2 folders (save_pretrained): a retrieval one and a generation one."
    from blip2_lab.config import get_preset
    from blip2_lab.interop import tiny_hf_blip2
    cfg = get_preset('tiny')
    cfg.eval.n_images = 4; cfg.eval.num_beams = 2
    words = _tiny_words(cfg, 80)
    ret_dir, gen_dir = tmp_path/'hf-itm', tmp_path/'hf-opt'
    hf = tiny_hf_blip2('retrieval'); hf.save_pretrained(ret_dir)
    _word_tokenizer(words[:110], 'bert').save_pretrained(ret_dir)
    hf = tiny_hf_blip2('generation'); hf.half().save_pretrained(gen_dir)   # released folders are fp16
    _word_tokenizer(words[:90], 'opt').save_pretrained(gen_dir)
    res = ev.evaluate(cfg, gen_dir, split='test', out=tmp_path/'eval', stage1_ckpt=ret_dir, progress=False)
    t = res['splits']['test']
    assert set(t) == {'retrieval', 'caption', 'vqa'}, t.keys()
    assert t['retrieval']['n_images'] == 4 and 0 <= t['retrieval']['itm']['txt_r10'] <= 100
    assert list(t['caption']) == ['llm', 'blind', 'constant']   # a HF retrieval folder has no ITG head
    assert t['caption']['blind']['caption'] and 0 <= t['caption']['constant']['cider']
    assert {'model', 'blind', 'majority', 'two_step'} <= set(t['vqa'])
    assert all(isinstance(s['model'], str) and isinstance(s['two_step'], str) for s in t['vqa']['samples'])
    assert t['vqa']['two_step']['overall'] >= 0 and t['vqa']['two_step_prompt'].startswith('<caption> ')
    md = (tmp_path/'eval'/'results.md').read_text()
    assert md.count('|') > 20 and 'two-step: own caption as text' in md
    # the retrieval folder alone: retrieval only, the rest skipped with a reason
    res = ev.evaluate(cfg, ret_dir, split='test', tasks='retrieval,vqa', progress=False)
    assert 'stage-2' in res['splits']['test']['skipped']['vqa']


@pytest.fixture(scope='module')
def tiny_s1(tmp_path_factory):
    "A stage-1 checkpoint of the tiny preset (a few seconds), shared by the tests of this module."
    from blip2_lab.config import get_preset
    from blip2_lab.train import train
    return train(get_preset('tiny'), 1, tmp_path_factory.mktemp('s1'), progress=False)


def _no_work(monkeypatch):
    "Make any evaluation work fail the test: the checks must come before it."
    def fail(*a, **k): raise AssertionError('evaluation ran before the check')
    monkeypatch.setattr(ev, 'evaluate_split', fail)


def test_cli_eval_unwritable_out(tiny_s1, tmp_path, capsys, monkeypatch):
    "--out under a regular file (a folder even root cannot make) fails before the work, with the fix."
    _no_work(monkeypatch)
    (tmp_path/'a_file').write_text('x')
    bad = tmp_path/'a_file'/'ev'
    rc = cli_main(['eval', '--ckpt', str(tiny_s1), '--tasks', 'retrieval', '--out', str(bad),
                   '--no-progress'])
    err = capsys.readouterr().err
    assert rc == 2 and f'cannot write the results to {bad}' in err and '--out DIR' in err, err


def test_evaluate_rescues_results_when_the_final_write_fails(tiny_s1, tmp_path, monkeypatch):
    "The output folder passes the check, the write after the work fails: the results are rescued."
    real = ev.write_results
    target = tmp_path/'ev'
    def flaky(results, out):
        if ev.resolve_path(out) == target: raise OSError(28, 'No space left on device')
        return real(results, out)
    monkeypatch.setattr(ev, 'write_results', flaky)
    from blip2_lab.config import get_preset, apply_overrides
    cfg = apply_overrides(get_preset('tiny'), ['eval.n_images=3', 'eval.k_test=2'])
    with pytest.raises(ev.EvalError, match='No space left on device') as e:
        ev.evaluate(cfg, tiny_s1, tasks='retrieval', out=target, progress=False)
    rescue = __import__('pathlib').Path(str(e.value).split('saved in ')[1].split(' instead')[0])
    saved = json.loads((rescue/'results.json').read_text())
    assert saved['splits']['test']['retrieval']['n_images'] == 3
    assert (rescue/'results.md').exists() and (rescue/'results.png').exists()


def test_vqa_prompt_without_slot_fails_before_work(tiny_s1, monkeypatch):
    "eval.vqa_prompt without {} (set past config validation): EvalError naming the key, before work."
    import copy
    from blip2_lab.config import get_preset
    _no_work(monkeypatch)
    cfg = copy.deepcopy(get_preset('tiny'))
    cfg.eval.vqa_prompt = 'Short answer:'
    with pytest.raises(ev.EvalError, match=r"vqa_prompt='Short answer:' needs exactly one \{\}"):
        ev.evaluate(cfg, tiny_s1, tasks='vqa', progress=False)
    # the prompt of the checkpoint's own config (cfg=None): checked once the model is loaded
    run = copy.deepcopy(cfg)
    monkeypatch.setattr(ev, 'load_views', lambda *a, **k: (None, object(), run))
    with pytest.raises(ev.EvalError, match='eval.vqa_prompt'):
        ev.evaluate(None, tiny_s1, tasks='vqa', progress=False)


def test_cli_eval_stage1_checkpoint(tiny_s1, tmp_path, capsys):
    "`blip2-lab eval` on a tiny stage-1 checkpoint: overrides apply, files are written, skipped tasks are said."
    s1 = tiny_s1
    rc = cli_main(['eval', '--ckpt', str(s1), '--tasks', 'retrieval,vqa', '--out', str(tmp_path/'ev'), '--no-progress',
                   'eval.n_images=5', 'eval.k_test=2'])
    assert rc == 0
    res = json.loads((tmp_path/'ev'/'results.json').read_text())
    rt = res['splits']['test']['retrieval']
    assert (rt['n_images'], rt['k_test']) == (5, 2)
    assert 'stage-2' in res['splits']['test']['skipped']['vqa']
    out = capsys.readouterr().out
    assert 'ITC + ITM rerank' in out and 'written to' in out
    assert cli_main(['eval', '--ckpt', str(s1), '--split', 'tset']) == 2
    assert 'choose test, ood' in capsys.readouterr().err
    assert cli_main(['eval', '--ckpt', str(s1), 'eval.k_test=0']) == 2
    assert 'eval.k_test' in capsys.readouterr().err


def test_evaluate_encoder_decoder_stage2(tmp_path):
    "A FlanT5-style (encoder-decoder) stage-2 model evaluates (VQA with the paper's length penalty -1)."
    from blip2_lab.config import get_preset, apply_overrides
    from blip2_lab.train import train
    cfg = apply_overrides(get_preset('tiny'), ['llm.kind=encoder-decoder', 'llm.model=tiny-random-t5', 'stage1.enabled=false',
                                               'stage2.steps=2', 'eval.n_images=2'])
    s2 = train(cfg, 2, tmp_path/'s2', progress=False)
    res = ev.evaluate(cfg, s2, split='ood', tasks=('caption', 'vqa'), progress=False)
    assert res['settings']['vqa_length_penalty'] == -1.0 and res['settings']['llm_kind'] == 'encoder-decoder'
    t = res['splits']['ood']
    assert list(t['caption']) == ['llm', 'blind', 'constant'] and {'model', 'blind', 'majority', 'two_step'} <= set(t['vqa'])
