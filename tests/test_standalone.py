"""The repository stands alone: no tracked file points at the developers' notes folder that sits
beside a developer's clone (one level up), which a user's clone does not have.

The folder's and the notes' names are assembled from pieces below, so that this file does not
itself contain what it looks for."""
import re, subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FOLDER = 'sha' + 'red'                               # the notes folder beside the clone
NOTES = ('BLIP2' + '_NOTES', 'ST' + 'YLE', 'NB' + 'DEV')   # the notes in it
OUTSIDE = re.compile(rf'\.\./{FOLDER}|(?<![\w.-]){FOLDER}/(?:{"|".join(NOTES)})|\b{NOTES[0]}\b')   # by path or by name


def tracked_text_files():
    try: names = subprocess.run(['git', 'ls-files'], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    except (OSError, subprocess.CalledProcessError): names = [str(p.relative_to(ROOT)) for p in ROOT.rglob('*') if p.is_file()]
    for n in names:
        p = ROOT/n
        if p.suffix in {'.png', '.safetensors', '.npy', '.json'} and p.stat().st_size > 200_000: continue
        try: yield n, p.read_text()
        except (UnicodeDecodeError, OSError): continue


def test_no_tracked_file_points_outside_the_repo():
    hits = [f'{n}:{t[:m.start()].count(chr(10)) + 1}' for n, t in tracked_text_files() for m in OUTSIDE.finditer(t)]
    assert not hits, f'files refer to notes a clone does not have: {hits}'


def test_the_check_can_fail():
    assert OUTSIDE.search(f'see ../{FOLDER}/{NOTES[2]}.md') and OUTSIDE.search(f'see `{FOLDER}/{NOTES[0]}.md`')
    assert OUTSIDE.search(f'(Sec. 3.1; {NOTES[0]})')
    assert not OUTSIDE.search(f'{FOLDER}_kv = 1; the {FOLDER}/ folder of a run')
