"""The rendered docs site, opened in headless Chromium: the Q-Former page shows its mask figure and
the viz page a trained model's query attention map.

`make test-docs` builds the site (with a trained tiny run when there is no `make lab` batch), then
runs this file with BLIP2_LAB_SITE_REQUIRED=1; under plain `pytest tests/` it is skipped until a
site has been built. Screenshots of both figures are written to _docs/screenshots/.
"""
import functools, http.server, os, shutil, threading
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SITE = Path(os.environ.get('BLIP2_LAB_SITE', ROOT/'_docs'/'html'))
SHOTS = ROOT/'_docs'/'screenshots'
CHROMIUM = os.environ.get('BLIP2_LAB_CHROMIUM') or shutil.which('chromium') or '/usr/bin/chromium'
# what the project's machines need to start Chromium headless as root with no network
CHROMIUM_ARGS = ['--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
                 '--disable-background-networking', '--disable-component-update', '--disable-sync']

# In the page of a cell (myst-nb): div.cell > div.cell_input (the code) + div.cell_output.
# Returns, for the first cell whose code contains `needle`, its images' natural widths and its text output.
CELL_JS = """needle => {
  for (const cell of document.querySelectorAll('div.cell')) {
    const code = cell.querySelector('.cell_input');
    if (!code || !code.innerText.includes(needle)) continue;
    const out = cell.querySelector('.cell_output');
    cell.id = cell.id || 'cell-under-test';
    return {id: cell.id, widths: out ? [...out.querySelectorAll('img')].map(i => i.naturalWidth) : [],
            text: out ? out.innerText : '', tables: out ? out.querySelectorAll('table').length : 0};
  }
  return null;
}"""


def _required() -> bool:
    return os.environ.get('BLIP2_LAB_SITE_REQUIRED') == '1'


@pytest.fixture(scope='module')
def site_url():
    if not (SITE/'index.html').exists():
        if _required(): pytest.fail(f'no site at {SITE}: run `make docs` (or docs/site/build.py) first')
        pytest.skip('the docs site is not built (make test-docs builds and checks it)')
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(SITE))
    handler.log_message = lambda *a, **k: None
    srv = http.server.ThreadingHTTPServer(('127.0.0.1', 0), handler)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield f'http://127.0.0.1:{srv.server_address[1]}'
    srv.shutdown()


@pytest.fixture(scope='module')
def browser():
    if not Path(CHROMIUM).exists():
        if _required(): pytest.fail(f'no Chromium at {CHROMIUM}: `make browser-deps` installs Debian\'s chromium')
        pytest.skip('Chromium is not installed (make browser-deps)')
    from playwright.sync_api import sync_playwright
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield b
        b.close()


def _cell(browser, url: str, needle: str, shot: str):
    page = browser.new_page(viewport={'width': 1400, 'height': 1000})
    page.goto(url, wait_until='load')
    page.wait_for_function("[...document.images].every(i => i.complete)")
    found = page.evaluate(CELL_JS, needle)
    assert found is not None, f'{url}: no cell whose code contains {needle!r}'
    SHOTS.mkdir(parents=True, exist_ok=True)
    page.locator(f"#{found['id']}").screenshot(path=str(SHOTS/shot))
    page.close()
    return found


def test_qformer_page_shows_the_mask_figure(site_url, browser):
    c = _cell(browser, f'{site_url}/03_qformer.html', 'fig = show_masks()', '03_qformer_masks.png')
    assert c['widths'] and max(c['widths']) > 200, f'the mask figure did not render: image widths {c["widths"]}'


def test_viz_page_shows_a_trained_models_attention(site_url, browser):
    shown = _cell(browser, f'{site_url}/08_viz.html', "print(f'showing {shown}')", '08_viz_model.png')['text']
    assert 'showing' in shown, f'08_viz does not say which model it shows: {shown!r}'
    assert 'random weights' not in shown, f'08_viz rendered the untrained tiny model: {shown!r} (make lab, or set BLIP2_LAB_VIZ_CKPT)'
    assert 'stage 2: none' not in shown, f'the model shown has no stage-2 checkpoint: {shown!r}'
    c = _cell(browser, f'{site_url}/08_viz.html', 'fig_attention = plot_query_attention(', '08_viz_attention.png')
    assert c['widths'] and max(c['widths']) > 200, f'the attention map did not render: image widths {c["widths"]}'


def test_markdown_tables_render_as_tables(site_url, browser):
    "display(Markdown(table)) outputs (the lab's results) are HTML tables, not lines of pipes."
    c = _cell(browser, f'{site_url}/09a_later_models.html', "_want = ['vqa_accuracy', 'cider', 'soft_prompt_tokens'", '09a_connectors.png')
    assert c['tables'] == 1 and '| connector |' not in c['text'], f"the connector table did not render: {c['text'][:200]!r}"
