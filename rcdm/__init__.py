"""rcdm: representation-conditioned diffusion models (Bordes, Balestriero, Vincent, TMLR 2022)."""

__version__ = "0.1.0"

# Public model API, imported lazily so that `import rcdm` (and the CLI) stay light.
_LAZY_EXPORTS = {
    "create_model_and_diffusion": "rcdm.factory",
    "model_and_diffusion_defaults": "rcdm.factory",
    "load_model": "rcdm.checkpoint",
}


def __getattr__(name: str):
    if name in _LAZY_EXPORTS:
        import importlib

        return getattr(importlib.import_module(_LAZY_EXPORTS[name]), name)
    raise AttributeError(f"module 'rcdm' has no attribute {name!r}")
