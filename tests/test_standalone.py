"""The repository stands alone: no tracked file points at the developers' notes folder beside the
clone (`../shared`), which a user's clone does not have."""
import re, subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUTSIDE = re.compile(r'\.\./shared|(?<![\w.-])shared/(?:BLIP2_NOTES|STYLE|NBDEV)|\bBLIP2_NOTES\b')   # the notes, by path or by name


def tracked_text_files():
    try: names = subprocess.run(['git', 'ls-files'], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    except (OSError, subprocess.CalledProcessError): names = [str(p.relative_to(ROOT)) for p in ROOT.rglob('*') if p.is_file()]
    for n in names:
        p = ROOT/n
        if p == Path(__file__).resolve(): continue   # this file names the pattern it looks for
        if p.suffix in {'.png', '.safetensors', '.npy', '.json'} and p.stat().st_size > 200_000: continue
        try: yield n, p.read_text()
        except (UnicodeDecodeError, OSError): continue


def test_no_tracked_file_points_outside_the_repo():
    hits = [f'{n}:{t[:m.start()].count(chr(10)) + 1}' for n, t in tracked_text_files() for m in OUTSIDE.finditer(t)]
    assert not hits, f'files refer to notes a clone does not have: {hits}'


def test_the_check_can_fail():
    assert OUTSIDE.search('see ../shared/NBDEV.md') and OUTSIDE.search('see `shared/BLIP2_NOTES.md`')
    assert OUTSIDE.search('(Sec. 3.1; BLIP2_NOTES)')
    assert not OUTSIDE.search('shared_kv = 1; the shared/ folder of a run')
