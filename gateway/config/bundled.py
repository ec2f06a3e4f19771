"""Where the shipped profiles and policies are, installed or in a checkout.

A wheel carries them as `gateway/bundled/{profiles,policies}`; an editable install or a
checkout has them at the top of the repository.
"""

from __future__ import annotations

from pathlib import Path

_PKG = Path(__file__).resolve().parent.parent  # the gateway package


def bundled_dir(name: str) -> Path:
    """`profiles` or `policies`, wherever this installation keeps them."""
    for candidate in (_PKG / "bundled" / name, _PKG.parent / name):
        if candidate.is_dir():
            return candidate
    raise FileNotFoundError(f"the shipped {name}/ directory is missing from this installation")
