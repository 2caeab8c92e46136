# Sphinx configuration of the docs site (docs/site/build.py copies it beside the executed notebooks).
import configparser
from pathlib import Path

_ini = configparser.ConfigParser()
_ini.read(Path(__file__).resolve().parents[2] / 'settings.ini')
_s = _ini['DEFAULT'] if _ini.has_section('DEFAULT') or _ini.defaults() else {}

project = 'blip2_lab'
author = _s.get('author', 'blip2_lab maintainers')
copyright = f"{author}; Apache License 2.0"
release = _s.get('version', '')

extensions = ['myst_nb']
nb_execution_mode = 'off'              # build.py executed every notebook already; myst-nb shows what they stored
myst_enable_extensions = ['dollarmath', 'amsmath']
nb_merge_streams = True                # one block per cell for its printed lines
nb_render_markdown_format = 'myst'     # display(Markdown(...)) outputs: tables too (commonmark has none)
suppress_warnings = ['mystnb.unknown_mime_type', 'misc.highlighting_failure']
exclude_patterns = ['_build', '**.ipynb_checkpoints']

html_theme = 'furo'
html_title = 'blip2_lab: BLIP-2, step by step'
