__version__ = "0.1.0"

# `import blip2_lab` stays light (no torch, no transformers): the public API is imported on first use (PEP 562).
_LAZY = {'load': 'blip2_lab.api'}   # name: module that defines it

def __getattr__(name):
    "blip2_lab.load -> blip2_lab.api.load, imported the first time it is asked for."
    if name in _LAZY:
        import importlib
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'blip2_lab' has no attribute {name!r}")

def __dir__(): return sorted(list(globals()) + list(_LAZY))
