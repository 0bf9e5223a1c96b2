"""sd-distill: turn a Stable Diffusion teacher into fast, small students."""

__version__ = "0.1.0"
