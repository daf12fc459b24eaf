"""The example files shipped with wsctl (`wsctl examples`).

In a wheel they live in the package (``wsctl/examples``); in a checkout, at the
top of the repository. Either way ``examples_dir()`` finds them.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

from wsctl.errors import EnvError, OperationalError
from wsctl.jsondoc import JsonDoc
from wsctl.queries import example_path


def examples_dir() -> Path:
    try:
        return example_path("registry.toml").parent
    except RuntimeError:
        raise EnvError("wsctl's examples/ directory is missing from the installation") from None


def example_files() -> list[Path]:
    return sorted(p for p in examples_dir().iterdir() if p.is_file() and not p.name.startswith("."))


@dataclass(frozen=True)
class CopyResult(JsonDoc):
    destination: Path
    copied: list[str]


def copy_examples(destination: Path, *, force: bool = False) -> CopyResult:
    """Copy the example files into ``destination`` (created if missing); an existing file
    is refused (nothing copied) unless ``force``."""
    files = example_files()
    destination = Path(destination)
    clash = [p.name for p in files if (destination / p.name).exists()]
    if clash and not force:
        raise OperationalError(
            f"{destination} already has {', '.join(clash)}; pass --force to overwrite"
        )
    try:
        destination.mkdir(parents=True, exist_ok=True)
        for p in files:
            shutil.copyfile(p, destination / p.name)
    except OSError as exc:
        raise EnvError(f"cannot copy the examples to {destination}: {exc.strerror}") from None
    return CopyResult(destination=destination, copied=[p.name for p in files])
