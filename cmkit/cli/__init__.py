"""Layer 7: the command line, a thin layer over the library: recipes (TOML into each section's dataclass and the
objective kind's config), jobs (recipe -> data + teacher -> objective -> trainer -> model), dry runs, commands."""

from .commands import build_parser, entry, main

__all__ = ["build_parser", "entry", "main"]
