"Tests of blip2_lab.evaluate beyond the notebook's own: errors users hit, the CLI, and evaluation of trained and Hugging Face checkpoints."
import json, os
from itertools import combinations
import pytest, torch
from blip2_lab import evaluate as ev
from blip2_lab.cli import main as cli_main


def test_vqa_accuracy_matches_subset_definition():
    "VQAv2 accuracy equals its definition (min(matches/3,1) averaged over the 10 choose 9 subsets) on random answer sets."
    g = torch.Generator().manual_seed(0)
    vocab = ['two', '2', 'Two.', 'three', 'red', 'the red', 'no', 'yes']
    for _ in range(200):
        answers = [vocab[int(i)] for i in torch.randint(0, len(vocab), (10,), generator=g)]
        pred = vocab[int(torch.randint(0, len(vocab), (1,), generator=g))]
        p = ev.normalize_answer(pred)
        want = sum(min(sum(ev.normalize_answer(a) == p for a in sub) / 3, 1) for sub in combinations(answers, 9)) / 10
        assert abs(ev.vqa_accuracy(pred, answers) - want) < 1e-12


def test_normalize_answer_cases():
    assert ev.normalize_answer('Three') == '3'
    assert ev.normalize_answer('the cat.') == 'cat'
    assert ev.normalize_answer('isnt') == "isn't"
    assert ev.normalize_answer('two dogs') == '2 dogs'
    assert ev.normalize_answer('10.5') == '10.5'


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
