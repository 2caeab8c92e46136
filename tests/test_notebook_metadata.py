"Every notebook opens without a 'Select Kernel' dialog: it names its kernel, and nbdev_clean keeps that."
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted(p for p in (ROOT/'nbs').rglob('*.ipynb') if '.ipynb_checkpoints' not in p.parts)


def test_every_notebook_names_its_kernel():
    assert len(NOTEBOOKS) >= 15
    missing = [str(p.relative_to(ROOT)) for p in NOTEBOOKS
               if json.loads(p.read_text())['metadata'].get('kernelspec', {}).get('name') != 'python3']
    assert not missing, f"notebooks without kernelspec python3 (JupyterLab asks for a kernel): {missing}"


def test_clean_keeps_the_kernelspec():
    from nbdev.clean import clean_nb
    nb = json.loads(NOTEBOOKS[0].read_text())
    clean_nb(nb)
    assert nb['metadata']['kernelspec']['name'] == 'python3'
