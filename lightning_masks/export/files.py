"""Files written all or nothing: a failure leaves any existing file as it was."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Union

__all__: list[str] = []  # the layer's own: its face is the folder's __init__.py


def atomic_write(destination: Union[str, os.PathLike], write: Callable[[str], object]) -> Path:
    """Call ``write(temporary_path)`` and move the result onto ``destination``: all or nothing."""
    destination = Path(destination)
    destination.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=destination.parent, suffix=".tmp")
    os.close(handle)
    try:
        write(temporary)
        os.replace(temporary, destination)
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)
    return destination
