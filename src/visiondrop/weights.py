"""Weights are read from safetensors only: a pickle (``pytorch_model.bin``, ``*.pt``, ...) can run code when loaded,
so every loader of ours refuses a folder without safetensors weights before anything is read, and asks
transformers for safetensors only (``use_safetensors=True``: it never calls ``torch.load``)."""

from __future__ import annotations

from pathlib import Path

__all__ = ["PICKLE_SUFFIXES", "check_safetensors"]

#: File suffixes of pickle-based weight formats (refused).
PICKLE_SUFFIXES: tuple[str, ...] = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")


def check_safetensors(folder: str | Path) -> None:
    """Refuse a local model folder whose weights are not in safetensors format.

    Parameters
    ----------
    folder : str or pathlib.Path
        A local model folder (an HF hub id is not checked here; ``use_safetensors=True`` covers it).

    Raises
    ------
    ValueError
        One line naming the pickle file when the folder holds one and no ``*.safetensors``, or naming the folder when
        it holds no weights at all.
    """
    path = Path(folder)
    if not path.is_dir():
        return
    if any(path.glob("*.safetensors")):
        return
    pickles = sorted(p for p in path.iterdir() if p.suffix.lower() in PICKLE_SUFFIXES)
    if pickles:
        raise ValueError(
            f"{pickles[0]}: pickle weights are refused (they can run code when loaded); visiondrop reads safetensors "
            "only, convert them to model.safetensors"
        )
    raise ValueError(
        f"{path}: no model.safetensors in this folder (visiondrop reads safetensors weights only)"
    )
