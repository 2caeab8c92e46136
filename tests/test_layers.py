"""The modules are layered: each may import only modules of lower layers (DESIGN.md, "Layers").

The layer list is read from DESIGN.md itself, so the document and this check cannot drift apart.
Imports are read from the source with `ast` (top-level and inside functions alike), so a lazy
import does not escape the rule.
"""
import ast, re
from pathlib import Path
import pytest

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT/'blip2_lab'

def layers(design: str) -> dict:
    "module -> layer number, from the ```layers block of DESIGN.md (`N  mod[, mod]  what it holds`)."
    block = re.search(r'```layers\n(.*?)```', design, re.S)
    assert block, "DESIGN.md has no ```layers block"
    out = {}
    for line in block.group(1).splitlines():
        m = re.match(r'\s*(\d+)\s+([\w, ]+?)(?:\s{2,}|$)', line)
        if m:
            for mod in m.group(2).split(','):
                out[mod.strip()] = int(m.group(1))
    return out

def imported_modules(source: str) -> set:
    "The blip2_lab modules a module's source imports (absolute or relative, anywhere in the file)."
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found |= {a.name.split('.')[1] for a in node.names if a.name.startswith('blip2_lab.')}
        elif isinstance(node, ast.ImportFrom):
            mod = node.module or ''
            if node.level == 1 or mod == 'blip2_lab' or mod.startswith('blip2_lab.'):
                sub = mod.removeprefix('blip2_lab').lstrip('.')
                if sub:
                    found.add(sub.split('.')[0])
                else:   # `from . import data` / `from blip2_lab import data`: the names are modules
                    found |= {a.name for a in node.names}
    return found

def upward_imports(layer_of: dict, sources: dict) -> list:
    "Every (module, imported module) where the imported one is not in a lower layer."
    bad = []
    for mod, src in sources.items():
        for dep in sorted(imported_modules(src)):
            if dep in layer_of and mod in layer_of and dep != mod and layer_of[dep] >= layer_of[mod]:
                bad.append((mod, dep))
    return bad

def package_sources() -> dict:
    return {p.stem: p.read_text() for p in PKG.glob('*.py') if p.stem not in ('__init__', '_modidx')}

def test_every_module_has_a_layer():
    layer_of = layers((ROOT/'DESIGN.md').read_text())
    missing = sorted(set(package_sources()) - set(layer_of))
    assert not missing, f"modules without a layer in DESIGN.md: {missing}"

def test_no_module_imports_a_higher_layer():
    layer_of = layers((ROOT/'DESIGN.md').read_text())
    bad = upward_imports(layer_of, package_sources())
    assert not bad, "imports that run up the layers (module -> imported): " + ', '.join(f'{a} -> {b}' for a, b in bad)

def test_the_check_catches_an_upward_import():
    layer_of = {'config': 0, 'qformer': 1, 'train': 2}
    sources = {'qformer': 'from .config import X\ndef f():\n    from blip2_lab.train import load\n',
               'train': 'from . import qformer\n', 'config': 'import os\n'}
    assert upward_imports(layer_of, sources) == [('qformer', 'train')]
    assert imported_modules('from blip2_lab import data as D\nimport blip2_lab.viz\n') == {'data', 'viz'}
