"""Build the docs site: every notebook of nbs/, executed, rendered by Sphinx + myst-nb into _docs/html.

    python docs/site/build.py [--jobs 2] [--only 03_qformer,08_viz] [--timeout 1800]

`make docs` installs the renderer (the `docs` extra) and runs this. Steps:
1. Each notebook is executed in a fresh kernel with nbs/ as its working directory, as nbdev_test
   and JupyterLab run it, but with matplotlib's inline backend so that its figures are kept.
   Cells nbdev_test skips (`#| eval: false`, `#| slow`, `#| notest`) are shown, not run, except an
   `#| eval: false` cell that says `# docs: execute` (08_viz's swap to the lab's full arm, which
   does nothing when there is no `make lab` batch).
2. nbdev's `#|` directive lines are removed from the shown code.
3. The executed notebooks go to _docs/src/ with this folder's conf.py, and Sphinx renders them
   (myst-nb reads the stored outputs; it executes nothing itself).
The site's pages keep the notebooks' order: the paper's path first, the appendices after.
"""
from __future__ import annotations

import argparse, os, re, shutil, subprocess, sys, time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
NBS, SRC, OUT = ROOT/'nbs', ROOT/'_docs'/'src', ROOT/'_docs'/'html'
PATH = ['00_config', '01_data', '02_backbones', '03_qformer', '03b_bert', '03a_interop', '04_stage1', '05_stage2',
        '05a_checkpoint', '06_train', '06a_diagnose', '07_eval', '08_viz', '09_ablate', '09a_later_models', '10_bench',
        '11_api']   # the paper's order
APPENDICES = ['02a_pretrain_backbones', '00a_files', '00b_distributed', '05b_toys', '99_cli']
SKIP_FLAGS = ('eval: false', 'slow', 'notest')   # what nbdev_test does not run (settings.ini: tst_flags)
DOCS_EXECUTE = '# docs: execute'

def directives(source: str) -> list[str]:
    "The nbdev directives of a cell (`#| hide` -> 'hide', `#| eval: false` -> 'eval: false')."
    return [m.strip() for m in re.findall(r'^#\s*\|\s*(.+)$', source, flags=re.M)]   # `#| x`, or `# | x` as black writes it

def runs_in_docs(source: str) -> bool:
    "Whether the site executes this code cell: every cell nbdev_test runs, and `# docs: execute` cells."
    flagged = any(d in SKIP_FLAGS for d in directives(source))
    return not flagged or DOCS_EXECUTE in source

def shown_source(source: str) -> str:
    "The code as the page shows it: without nbdev's `#|` lines."
    return re.sub(r'^#\|.*\n?', '', source, flags=re.M).strip('\n')

def execute(name: str, timeout: int = 1800) -> tuple[str, float]:
    "Execute nbs/<name>.ipynb and write the page's notebook to _docs/src/<name>.ipynb; (name, seconds)."
    import nbformat
    from nbclient import NotebookClient
    t0 = time.time()
    nb = nbformat.read(NBS/f'{name}.ipynb', as_version=4)
    held = {}                                    # cells shown but not run: blanked while the kernel runs
    for i, c in enumerate(nb.cells):
        if c.cell_type == 'code' and not runs_in_docs(c.source): held[i], c.source = c.source, ''
    os.environ.pop('MPLBACKEND', None)           # the kernel's inline backend keeps the figures
    NotebookClient(nb, timeout=timeout, kernel_name='python3', resources={'metadata': {'path': str(NBS)}},
                   extra_arguments=['--IPKernelApp.log_level=CRITICAL']).execute()   # no TCP warning per kernel
    for i, c in enumerate(nb.cells):
        if i in held: c.source, c.outputs = held[i], []
        if c.cell_type != 'code': continue
        d = directives(c.source)
        tags = c.metadata.setdefault('tags', [])
        if 'hide' in d: tags.append('remove-cell')
        if 'echo: false' in d: tags.append('remove-input')
        if 'output: false' in d: tags.append('remove-output')
        c.source = shown_source(c.source)
    nb.cells = [c for c in nb.cells if not (c.cell_type == 'code' and not c.source and not c.outputs)]
    nb.metadata.pop('widgets', None)             # widget state needs a kernel: the page shows the text fallback
    nbformat.write(nb, SRC/f'{name}.ipynb')
    return name, time.time() - t0

def toctree(caption: str, names: list[str]) -> str:
    return '\n'.join(['```{toctree}', ':maxdepth: 1', f':caption: {caption}', '', *names, '```'])

def index_page() -> None:
    "The landing page: nbs/index.ipynb with the site's table of contents after it."
    import nbformat
    nb = nbformat.read(SRC/'index.ipynb', as_version=4)
    nb.cells.append(nbformat.v4.new_markdown_cell(toctree("BLIP-2, in the paper's order", PATH) + '\n\n'
                                                    + toctree('Appendices', APPENDICES)))
    nbformat.write(nb, SRC/'index.ipynb')

def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    ap.add_argument('--jobs', type=int, default=2, help='notebooks executed at a time')
    ap.add_argument('--only', default='', help='comma-separated notebook names to re-execute (the rest kept from the last build)')
    ap.add_argument('--timeout', type=int, default=1800, help='seconds a cell may run')
    a = ap.parse_args(argv)
    names = ['index', *PATH, *APPENDICES]
    missing = [n for n in names if not (NBS/f'{n}.ipynb').exists()]
    if missing: raise SystemExit(f"docs/site/build.py: notebooks {missing} are not in nbs/: update PATH / APPENDICES in {__file__}")
    todo = [n for n in a.only.split(',') if n] or names
    unknown = set(todo) - set(names)
    if unknown: raise SystemExit(f"--only names {sorted(unknown)}: not pages of the site (pages: {', '.join(names)})")
    if a.only and not SRC.exists(): raise SystemExit("--only needs a previous full build (_docs/src is missing): run without --only first")
    if not a.only: shutil.rmtree(SRC, ignore_errors=True)
    SRC.mkdir(parents=True, exist_ok=True)
    shutil.copy(Path(__file__).parent/'conf.py', SRC/'conf.py')
    t0 = time.time()
    with ProcessPoolExecutor(a.jobs) as ex:
        for name, s in ex.map(execute, todo, [a.timeout] * len(todo)):
            print(f"executed {name}.ipynb in {s:.0f} s", flush=True)
    if 'index' in todo: index_page()
    print(f"notebooks executed in {time.time() - t0:.0f} s; rendering", flush=True)
    r = subprocess.run([sys.executable, '-m', 'sphinx', '-b', 'html', '-q', '-j', str(a.jobs), str(SRC), str(OUT)])
    if r.returncode: return r.returncode
    print(f"site: {OUT/'index.html'} ({time.time() - t0:.0f} s in all)")
    return 0

if __name__ == '__main__':
    sys.exit(main())
