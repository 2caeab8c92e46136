"""blip2_lab.data: determinism, splits, skills, the real-data loaders and every bad-input message.

Small fixture files (COCO Karpathy JSON, VQAv2, JSONL, images) are written into pytest's tmp_path.
Runs in a few seconds with OMP_NUM_THREADS=1.
"""
import json, os, re, subprocess, sys
from dataclasses import asdict
from pathlib import Path
import numpy as np
import pytest
from PIL import Image

from blip2_lab import data as D
from blip2_lab.config import DataConfig, get_preset, Blip2LabError


def tiny(**kw):
    "The tiny preset's data config, with overrides."
    return DataConfig(**{**asdict(get_preset('tiny').data), **kw})


@pytest.fixture(scope='module')
def built(tmp_path_factory):
    "The tiny preset built once into a temporary folder."
    root = tmp_path_factory.mktemp('sw')/'tiny'
    D.build_shapesworld(tiny(root=str(root)), quiet=True)
    return root


# --- ShapesWorld: determinism, cache, splits, skills -------------------------------------

def test_same_seed_same_bytes_other_seed_different(tmp_path, built):
    rc = D.cli_data(['--preset', 'tiny', '--seed', '0', '--out', str(tmp_path/'a'), '--quiet'])
    assert rc == 0
    a, b = D.read_manifest(tmp_path/'a'), D.read_manifest(built)
    assert a['sha256'] == b['sha256'] and a['files'] == b['files']
    for f in a['files']: assert (tmp_path/'a'/f).read_bytes() == (built/f).read_bytes()
    D.cli_data(['--preset', 'tiny', '--seed', '1', '--out', str(tmp_path/'c'), '--quiet'])
    c = D.read_manifest(tmp_path/'c')
    assert c['sha256'] != a['sha256'] and c['seed'] == 1
    assert c['files']['train.npy'] != a['files']['train.npy'] and c['files']['corpus.txt'] != a['files']['corpus.txt']


def test_cache_is_reused_and_parameters_invalidate_it(tmp_path, capsys):
    out = tmp_path/'d'
    (tmp_path/'.d.tmp-999999').mkdir()  # left behind by a killed build: cleaned up by the next one
    D.cli_data(['--preset', 'tiny', '--out', str(out), '--quiet'])
    assert 'built ShapesWorld' in capsys.readouterr().out
    t = (out/'train.npy').stat().st_mtime_ns
    D.cli_data(['--preset', 'tiny', '--out', str(out), '--quiet'])
    printed = capsys.readouterr().out
    assert 'reusing cached' in printed and 'existence' in printed and 'held-out' in printed
    assert (out/'train.npy').stat().st_mtime_ns == t
    D.cli_data(['--preset', 'tiny', '--out', str(out), '--quiet', 'n_train=10'])  # another parameter: rebuilt
    assert 'built ShapesWorld' in capsys.readouterr().out
    assert D.read_manifest(out)['splits']['train']['images'] == 10
    assert not list(tmp_path.glob('.d.tmp-*')) and not list(tmp_path.glob('.d.old-*'))  # no leftovers


def test_ood_combinations_never_in_train(built):
    objs = lambda split: [o for r in json.loads((built/f'{split}.json').read_text()) for o in r['meta']['scene']['objects']]
    held = set(D.HELDOUT)
    assert {(o['colour'], o['shape']) for o in objs('ood')} <= held
    for split in ('web', 'train', 'val', 'test'):
        assert not {(o['colour'], o['shape']) for o in objs(split)} & held, split
    # nor named anywhere in the training text (captions, questions, corpus)
    text = (built/'train.json').read_text() + (built/'corpus.txt').read_text()
    for c, s in held: assert f'{c} {s}' not in text


def test_lab_test_split_has_every_skill_500_times():
    counts = D.skill_counts(D.make_records(get_preset('lab').data, 'test'))
    assert set(counts) == set(D.SKILLS)
    assert min(counts.values()) >= 500, counts


def test_answers_are_short_and_existence_probes_absent_objects():
    recs = D.make_records(get_preset('lab').data, 'val', 300)
    qs = [q for r in recs for q in r['questions']]
    assert all(len(q['answers']) == 1 and len(q['answers'][0].split()) == 1 for q in qs)
    ex = [q for q in qs if q['skill'] == 'existence']
    assert {q['answers'][0] for q in ex} == {'yes', 'no'}
    assert sum(q['answers'][0] == 'no' for q in ex) == sum(q['answers'][0] == 'yes' for q in ex)
    for r in recs:  # every absent object really is absent
        present = {(o['colour'], o['shape']) for o in r['meta']['scene']['objects']}
        for q in r['questions']:
            if q['qtype'] == 'absent':
                c, s = re.match(r'Is there an? (\w+) (\w+)\?', q['question']).groups()
                assert (c, s) not in present


def test_dataset_interface(built):
    ds = D.get_dataset(tiny(root=str(built)), 'test')
    assert len(ds) == 16 and len(set(ds.image_ids)) == 16
    s = ds[3]
    assert isinstance(s, D.Sample) and s.image.mode == 'RGB' and s.image.size == (32, 32)
    assert len(s.captions) == 5 and all(isinstance(q, D.QA) for q in s.questions)
    assert ds.images_uint8([3]).shape == (1, 32, 32, 3) and (ds.images_uint8([3])[0] == np.asarray(s.image)).all()
    assert not ds.hflip_ok


def test_torch_datasets_and_collate(built):
    import torch
    ds = D.get_dataset(tiny(root=str(built)), 'val')
    cp = D.CaptionPairs(ds, D.image_transform(32, train=True), seed=3)
    loader = torch.utils.data.DataLoader(cp, batch_size=4, collate_fn=D.collate_dicts)
    b = next(iter(loader))
    assert b['pixel_values'].shape == (4, 3, 32, 32) and len(b['text']) == 4 and b['image_index'].tolist() == [0, 1, 2, 3]
    first = [cp[i]['text'] for i in range(len(ds))]
    assert first == [cp[i]['text'] for i in range(len(ds))]  # deterministic within an epoch
    cp.set_epoch(1)
    assert first != [cp[i]['text'] for i in range(len(ds))]   # another caption next epoch
    vi = D.VQAItems(ds, D.image_transform(32, train=False))
    b = D.collate_dicts([vi[k] for k in range(6)])
    assert set(b) >= {'pixel_values', 'question', 'answers', 'skill', 'image_id', 'image_index'}
    assert isinstance(b['answers'][0], list) and b['image_index'].dtype == torch.int64


def test_transforms_follow_the_paper():
    from torchvision import transforms as T
    tr = D.image_transform(224, train=True, hflip=True).transforms
    rrc = next(t for t in tr if isinstance(t, T.RandomResizedCrop))
    assert rrc.scale == (0.5, 1.0) and rrc.interpolation == T.InterpolationMode.BICUBIC
    assert any(isinstance(t, T.RandomHorizontalFlip) for t in tr)
    ev = D.image_transform(224, train=False).transforms
    rs = next(t for t in ev if isinstance(t, T.Resize))
    assert tuple(rs.size) == (224, 224) and rs.interpolation == T.InterpolationMode.BICUBIC
    assert not any(isinstance(t, (T.CenterCrop, T.RandomHorizontalFlip)) for t in ev)
    norm = next(t for t in ev if isinstance(t, T.Normalize))
    assert tuple(norm.mean) == D.CLIP_MEAN and tuple(norm.std) == D.CLIP_STD
    x = D.image_transform(224, False)(Image.new('RGB', (300, 200), (10, 20, 30)))
    assert x.shape == (3, 224, 224)


# --- real-data loaders and bad input ------------------------------------------------------

@pytest.fixture
def fx(tmp_path):
    "An image folder with three good COCO-named images and a corrupt one."
    img = tmp_path/'img'; img.mkdir()
    for k in (1, 2, 3):
        Image.fromarray(np.full((40, 50, 3), 40 * k, np.uint8)).save(img/f'COCO_val2014_{k:012d}.jpg')
    (img/'COCO_val2014_000000000009.jpg').write_bytes(b'\x00garbage')
    return tmp_path


def cfg_for(fx, **kw):
    return DataConfig(**{**asdict(DataConfig()), 'images': str(fx/'img'), **kw})


def test_coco_karpathy_lavis_and_original(fx):
    lavis_train = [dict(image='COCO_val2014_000000000001.jpg', caption='a grey square', image_id='coco_1'),
                   dict(image='COCO_val2014_000000000001.jpg', caption='grey', image_id='coco_1'),
                   dict(image='COCO_val2014_000000000002.jpg', caption='lighter grey', image_id='coco_2')]
    (fx/'coco_karpathy_train.json').write_text(json.dumps(lavis_train))
    ds = D.get_dataset(cfg_for(fx, source='coco', annotations=str(fx/'coco_karpathy_{split}.json')), 'train')
    assert ds.image_ids == ['coco_1', 'coco_2'] and ds.captions(0) == ['a grey square', 'grey'] and ds.hflip_ok
    fp = ds.fingerprint
    (fx/'coco_karpathy_train.json').write_text(json.dumps(lavis_train[:2]))
    assert D.get_dataset(cfg_for(fx, source='coco', annotations=str(fx/'coco_karpathy_{split}.json')), 'train').fingerprint != fp
    assert ds.images_uint8([0, 1], size=24).shape == (2, 24, 24, 3)
    orig = dict(images=[dict(filepath='', filename=f'COCO_val2014_{k:012d}.jpg', cocoid=k, split=sp, sentences=[dict(raw=f'cap {k}')])
                        for k, sp in ((1, 'train'), (2, 'restval'), (3, 'test'))])
    (fx/'dataset_coco.json').write_text(json.dumps(orig))
    c = cfg_for(fx, source='coco', annotations=str(fx/'dataset_coco.json'))
    assert D.get_dataset(c, 'train').image_ids == ['1', '2']
    assert D.get_dataset(c, 'test')[0].captions == ['cap 3']


def test_vqav2(fx):
    q = dict(questions=[dict(image_id=2, question='What colour is it?', question_id=20),
                        dict(image_id=2, question='Is it dark?', question_id=21)])
    a = dict(annotations=[dict(question_id=20, image_id=2, answer_type='other', question_type='what color',
                               answers=[dict(answer='grey', answer_id=i) for i in range(10)])])
    (fx/'v2_questions.json').write_text(json.dumps(q)); (fx/'v2_annotations.json').write_text(json.dumps(a))
    ds = D.get_dataset(cfg_for(fx, source='vqav2', annotations=str(fx/'v2_questions.json'), answers=str(fx/'v2_annotations.json')), 'val')
    assert len(ds) == 1 and ds[0].image.size == (50, 40) and ds.captions(0) == []
    qa = ds.questions(0)
    assert qa[0].answers == ['grey'] * 10 and qa[0].skill == 'other' and qa[0].qtype == 'what color' and qa[1].answers == []
    assert len(D.VQAItems(ds, D.image_transform(32, False))) == 2


def test_jsonl_and_bad_line(fx):
    lines = [json.dumps(dict(image='COCO_val2014_000000000001.jpg', captions=['one'], questions=[dict(question='Q?', answers=['a'], skill='colour')])),
             '{"image": "COCO_val2014_000000000002.jpg", "captions": [',
             json.dumps(dict(image='COCO_val2014_000000000003.jpg', caption='three', questions=[dict(question='R?', answer='b')]))]
    (fx/'d.jsonl').write_text('\n'.join(lines))
    c = cfg_for(fx, source='jsonl', annotations=str(fx/'d.jsonl'))
    with pytest.raises(D.DataError, match=r'd\.jsonl line 2: not valid JSON'): D.get_dataset(c, 'test')
    with pytest.warns(UserWarning, match='skipped 1 bad record'):
        ds = D.get_dataset(c, 'test', skip_bad=True)
    assert len(ds) == 2 and ds.report['skipped'] == 1 and 'line 2' in ds.report['problems'][0]
    assert ds.questions(1) == [D.QA('R?', ['b'], '', '')] and ds.captions(1) == ['three']
    assert 'skipped' in repr(ds)


@pytest.mark.parametrize('content,msg', [
    ('[{"image": "a.jpg", "caption": ]', r'bad\.json is not valid JSON: Expecting value at line 1, column 32'),
    ('{"images": 3}', r"not a COCO Karpathy file"),
    (json.dumps([dict(image='COCO_val2014_000000000001.jpg', caption='')]), r'bad\.json record 0 \(image COCO_val2014_000000000001\.jpg\): caption 0 is empty'),
    (json.dumps([dict(image='missing.jpg', caption='x')]), r'bad\.json record 0: image .*missing\.jpg does not exist'),
    (json.dumps([dict(caption='x')]), r"bad\.json record 0: expected an object with 'image' and 'caption'"),
])
def test_bad_coco_input_names_file_record_and_problem(fx, content, msg):
    (fx/'bad.json').write_text(content)
    with pytest.raises(D.DataError, match=msg):
        D.get_dataset(cfg_for(fx, source='coco', annotations=str(fx/'bad.json')), 'test')


def test_corrupt_image_strict_and_skipped(fx):
    recs = [dict(image=f'COCO_val2014_{k:012d}.jpg', caption=f'c{k}', image_id=str(k)) for k in (1, 9, 2)]
    (fx/'c.json').write_text(json.dumps(recs))
    c = cfg_for(fx, source='coco', annotations=str(fx/'c.json'))
    ds = D.get_dataset(c, 'test')  # strict: files are checked for existence; decoding fails at use, loudly
    with pytest.raises(D.DataError, match=r'COCO_val2014_000000000009\.jpg \(record 9\) is corrupt or not an image'): ds[1]
    with pytest.warns(UserWarning):
        ds = D.get_dataset(c, 'test', skip_bad=True)  # skip_bad: every image is verified once, the bad one skipped
    assert ds.image_ids == ['1', '2'] and ds.report['skipped'] == 1 and 'corrupt' in ds.report['problems'][0]


def test_other_bad_inputs(fx, built):
    with pytest.raises(D.DataError, match=r"unknown split 'dev': ShapesWorld has web, train, val, test, ood"):
        D.get_dataset(tiny(root=str(built)), 'dev')
    (fx/'x.json').write_text('[]')
    with pytest.raises(D.DataError, match=r"unknown split 'web' for COCO"):
        D.get_dataset(cfg_for(fx, source='coco', annotations=str(fx/'x.json')), 'web')
    with pytest.raises(D.DataError, match=r'no usable records'):
        D.get_dataset(cfg_for(fx, source='coco', annotations=str(fx/'x.json')), 'test')
    with pytest.raises(D.DataError, match=r'annotation file .*nothere\.json does not exist'):
        D.get_dataset(cfg_for(fx, source='coco', annotations=str(fx/'nothere.json')), 'test')
    with pytest.raises(D.DataError, match=r'data\.annotations is empty'):
        D.get_dataset(cfg_for(fx, source='jsonl'), 'test')
    with pytest.raises(D.DataError, match=r"unknown preset 'huge': choose one of tiny, lab, gpu, paper"):
        D.cli_data(['--preset', 'huge'])
    with pytest.raises(Blip2LabError, match=r"unknown config key 'data.n_trian'"):
        D.cli_data(['--preset', 'tiny', 'n_trian=3'])
    with pytest.raises(D.DataError, match=r'only generates ShapesWorld'):
        D.cli_data(['--preset', 'paper'])
    (built/'val.npy').rename(built/'val.npy.bak')
    try:
        with pytest.raises(D.DataError, match=r'val\.npy is missing: rebuild'): D.load_shapesworld(built, 'val')
    finally: (built/'val.npy.bak').rename(built/'val.npy')


def test_console_script_reports_errors_and_exit_codes(tmp_path):
    from blip2_lab.cli import main
    assert main(['data', '--preset', 'tiny', '--out', str(tmp_path/'e'), '--quiet']) == 0
    assert D.read_manifest(tmp_path/'e')['splits']['test']['images'] == 16
    r = subprocess.run([sys.executable, '-c', 'from blip2_lab.cli import main; raise SystemExit(main(["data", "--preset", "nope"]))'],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "error: unknown preset 'nope'" in r.stderr


# --- issue 24: nothing lost, nothing silent -----------------------------------------------

def test_sixteen_bit_png_keeps_its_brightness(fx):
    "A 16-bit grey PNG loaded ~99% white (convert('RGB') clips); now its mean is the source's / 257."
    ramp = np.linspace(0, 65535, 80 * 60).reshape(60, 80).astype(np.uint16)
    Image.fromarray(ramp).save(fx/'img'/'deep.png')
    with Image.open(fx/'img'/'deep.png') as im: assert im.mode in ('I;16', 'I')  # a real 16-bit file
    (fx/'deep.json').write_text(json.dumps([dict(image='deep.png', caption='a grey ramp', image_id='d')]))
    ds = D.get_dataset(cfg_for(fx, source='coco', annotations=str(fx/'deep.json')), 'test')
    img = np.asarray(ds[0].image)
    assert ds[0].image.mode == 'RGB' and img.shape == (60, 80, 3)
    assert abs(img.mean() - ramp.mean() / 257) < 0.5, img.mean()        # rounding to 8-bit levels: < 0.5
    assert abs(int(img[-1, -1, 0]) - 255) <= 1 and img[0, 0, 0] == 0    # black stays black, white white
    # the transform that models see, fed the 16-bit image directly: same brightness within 1% of white
    with Image.open(fx/'img'/'deep.png') as im: x = D.image_transform(32, train=False)(im)
    assert abs(float((x[0] * D.CLIP_STD[0] + D.CLIP_MEAN[0]).mean()) - ramp.mean() / 65535) < 0.01


def test_karpathy_record_without_split_is_an_error_or_counted(fx):
    "A dataset_coco.json record with no split used to vanish from every split without a word."
    rec = lambda k, **kw: dict(filepath='', filename=f'COCO_val2014_{k:012d}.jpg', cocoid=k, sentences=[dict(raw='x')], **kw)
    recs = [rec(1, split='train'), rec(2), rec(3, split='restval')]
    (fx/'dataset_coco.json').write_text(json.dumps(dict(images=recs)))
    c = cfg_for(fx, source='coco', annotations=str(fx/'dataset_coco.json'))
    msg = (r'dataset_coco\.json record 1 \(image COCO_val2014_000000000002\.jpg\) has no split field: '
           r'set it to one of train, restval, val, test, or pass skip_bad=True')
    with pytest.raises(D.DataError, match=msg):
        D.get_dataset(c, 'train')
    with pytest.warns(UserWarning, match='skipped 1 bad record'):
        ds = D.get_dataset(c, 'train', skip_bad=True)
    assert ds.image_ids == ['1', '3'] and ds.report['skipped'] == 1 and 'record 1' in ds.report['problems'][0]
    # LAVIS files: without any split field the file is one split (as before); with some, each record needs one
    lavis = [dict(image=f'COCO_val2014_{k:012d}.jpg', caption='x') for k in (1, 2)]
    (fx/'l.json').write_text(json.dumps(lavis))
    assert len(D.get_dataset(cfg_for(fx, source='coco', annotations=str(fx/'l.json')), 'val')) == 2
    (fx/'l.json').write_text(json.dumps([{**lavis[0], 'split': 'val'}, lavis[1]]))
    with pytest.raises(D.DataError, match=r'l\.json record 1 .* has no split field'):
        D.get_dataset(cfg_for(fx, source='coco', annotations=str(fx/'l.json')), 'val')


def _flip_last_byte(path, mtime_step_ns=10 ** 9):
    "Invert the last byte of `path`; move its mtime on (a set step: independent of the clock's resolution)."
    st = path.stat()
    raw = bytearray(path.read_bytes())
    raw[-1] ^= 0xFF
    path.write_bytes(bytes(raw))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + mtime_step_ns))


def test_changed_split_file_is_detected_on_reuse_and_load(tmp_path, capsys):
    "A changed train.npy used to be reused as 'reusing cached'; now load names it and a build rebuilds it."
    out = tmp_path/'sw'
    D.cli_data(['--preset', 'tiny', '--out', str(out), '--quiet'])
    man = D.read_manifest(out)
    capsys.readouterr()
    _flip_last_byte(out/'train.npy')
    msg = r'train\.npy changed since the build \(sha256 differs from manifest\.json\): rebuild with `blip2-lab data --out .* --force`'
    with pytest.raises(D.DataError, match=msg):
        D.load_shapesworld(out, 'train')
    assert len(D.load_shapesworld(out, 'test')) == 16  # the untouched split still loads
    with pytest.warns(UserWarning, match=r'train\.npy missing or changed since the build'):
        D.cli_data(['--preset', 'tiny', '--out', str(out), '--quiet'])
    printed = capsys.readouterr().out
    assert 'built ShapesWorld' in printed and 'reusing cached' not in printed
    assert D._sha256(out/'train.npy') == man['files']['train.npy'] and D.changed_files(out, man) == []
    # a new process with no hash cache hashes every file: even an edit that kept size and mtime is found
    _flip_last_byte(out/'val.json', mtime_step_ns=0)
    (out/D.HASH_CACHE).unlink()
    code = f'from blip2_lab import data as D; D.load_shapesworld({str(out)!r}, "val")'
    r = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True)
    assert r.returncode != 0 and 'val.json changed since the build' in r.stderr, r.stderr[-500:]
