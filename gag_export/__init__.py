"""gag-export: Geometry-Aware Attention Guidance computed inside exported diffusion graphs."""

__version__ = "0.1.0"
