"""TransformerLens 4 as the reference for our TransformerLens aliases (``tl=`` in model/sites.py).

TransformerLens 4 runs Gemma 3 through a ``TransformerBridge`` around a transformers
``Gemma3ForCausalLM``; here that model holds our weights (``hf_reference.hf_model_from``, eager
attention), built the way ``bench/cache.py`` builds it (``build_bridge_from_module``, nothing
downloaded). Weights are not processed (no ``enable_compatibility_mode``) unless asked for.

Writing the golden file (run where transformer-lens>=4.3 is installed; it is small, committed):

    python tests/model/tl_reference.py

The golden file holds the demo model's token ids (``input_ids``) and, for the layers in
:data:`LAYERS`, every name of :func:`interp.model.tl_aliases` as TransformerLens cached it.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
GOLDEN = HERE / "data" / "tl_golden_gemma3_270m.safetensors"
PROMPT = "The capital of"
LAYERS = (0, 5)  # a sliding-window layer and the first global one (a different RoPE base)


def build_bridge(model, compatibility_mode: bool = False):
    """A TransformerLens ``TransformerBridge`` over a transformers copy of ``model``'s weights."""
    from transformer_lens.model_bridge.sources import build_bridge_from_module

    sys.path.insert(0, str(HERE.parent))
    from hf_reference import hf_model_from

    hf = hf_model_from(model)
    bridge = build_bridge_from_module(hf, "Gemma3ForCausalLM", hf_config=hf.config, model_name="gemma-3-270m-demo")
    bridge.eval()
    if compatibility_mode:
        bridge.enable_compatibility_mode()
    return bridge


def aliased_names(n_layers: int, layers: tuple[int, ...] | None = None) -> list[str]:
    """Every TransformerLens alias at ``layers`` (default: all), in site order."""
    from interp.model.config import Gemma3Config
    from interp.model.sites import tl_aliases

    cfg = Gemma3Config(n_layers=n_layers, d_model=8, d_mlp=8, n_heads=1, n_kv_heads=1, d_head=8, vocab_size=9)
    keep = set(range(n_layers) if layers is None else layers)
    return [a for a in tl_aliases(cfg) if not a.startswith("blocks.") or int(a.split(".")[1]) in keep]


def tl_cache(bridge, ids: torch.Tensor, names: list[str]) -> dict[str, torch.Tensor]:
    """TransformerLens's ``run_with_cache`` of ``names`` (each must be one of its hook names)."""
    wanted = set(names)
    _, cache = bridge.run_with_cache(ids, names_filter=lambda name: name in wanted)
    missing = wanted - set(cache.keys())
    if missing:
        raise KeyError(f"TransformerLens cached no {sorted(missing)[:5]}")
    return {n: cache[n].detach().float().clone() for n in names}


def write_golden(path: Path = GOLDEN) -> Path:
    """Run TransformerLens on the demo model and write the golden file (input_ids + aliased names)."""
    from importlib.metadata import version

    import transformers
    from safetensors.torch import save_file

    from interp.model import Gemma3

    model = Gemma3.from_pretrained("demo")
    ids = model.to_tokens(PROMPT)
    tensors = tl_cache(build_bridge(model), ids, aliased_names(model.cfg.n_layers, LAYERS))
    tensors["input_ids"] = ids.to(torch.int64)
    meta = {"transformer_lens": version("transformer-lens"),
            "transformers": transformers.__version__, "torch": torch.__version__, "prompt": PROMPT,
            "layers": ",".join(map(str, LAYERS)), "written_by": "tests/model/tl_reference.py"}
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata=meta)
    return path


if __name__ == "__main__":
    torch.set_num_threads(2)
    out = write_golden()
    print(f"wrote {out} ({out.stat().st_size / 1024:.0f} KiB)")
