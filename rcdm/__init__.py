"""rcdm: representation-conditioned diffusion models (Bordes, Balestriero, Vincent, TMLR 2022)."""

__version__ = "0.1.0"
