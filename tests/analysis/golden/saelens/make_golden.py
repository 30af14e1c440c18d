"""Write the SAELens golden files: one folder per architecture / setting, saved by SAELens's own
``save_model``, with SAELens's own outputs on a fixed input beside it (``outputs.safetensors``:
``x``, ``encode``, ``decode`` = decode(encode(x)), ``forward``).

Run in a virtual environment with SAELens installed (``.ci/saelens-venv`` builds one), from this
folder's parent or anywhere:

    /work/venvs/side-saelens/bin/python tests/analysis/golden/saelens/make_golden.py

It rewrites every case folder beside this script (and ``VERSION``). Tiny widths, fixed seeds.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import sae_lens
import torch
from sae_lens import SAE
from safetensors.torch import save_file

HERE = Path(__file__).resolve().parent
D_IN, D_SAE, D_OUT = 16, 32, 12
SAE_HOOK, TC_OUT = "blocks.1.hook_resid_post", "blocks.1.hook_mlp_out"


def case(name, architecture, *, hook=SAE_HOOK, dtype="float32", d_out=None, x_shape=(6, D_IN), **cfg):
    cfg = {"architecture": architecture, "d_in": D_IN, "d_sae": D_SAE, "dtype": dtype, "device": "cpu", **cfg}
    cfg["metadata"] = {"hook_name": hook, "model_name": "tiny", "hf_hook_name": None}
    if d_out is not None:
        cfg["d_out"] = d_out
        cfg["metadata"]["hook_name_out"] = TC_OUT
    return name, cfg, x_shape


CASES = [
    case("standard", "standard"),  # apply_b_dec_to_input=True: SAELens's default
    case("standard_no_b_dec", "standard", apply_b_dec_to_input=False),
    case("gated", "gated"),
    case("jumprelu", "jumprelu"),
    case("jumprelu_bf16", "jumprelu", dtype="bfloat16"),
    case("topk", "topk", k=5),
    case("topk_rescale", "topk", k=5, rescale_acts_by_decoder_norm=True),
    case("abstopk", "abstopk", k=5, apply_b_dec_to_input=False),
    case("standard_constant_norm_rescale", "standard", normalize_activations="constant_norm_rescale"),
    case("jumprelu_layer_norm", "jumprelu", normalize_activations="layer_norm"),
    case("topk_layer_norm_rescale", "topk", k=5, normalize_activations="layer_norm",
         rescale_acts_by_decoder_norm=True),
    case("standard_expected_average", "standard", normalize_activations="expected_average_only_in"),
    case("jumprelu_hook_z", "jumprelu", hook="blocks.1.attn.hook_z", reshape_activations="hook_z",
         x_shape=(6, 4, 4)),
    case("transcoder", "transcoder", d_out=D_OUT, apply_b_dec_to_input=False),
    case("skip_transcoder", "skip_transcoder", d_out=D_OUT, apply_b_dec_to_input=False),
    case("jumprelu_transcoder", "jumprelu_transcoder", d_out=D_OUT, apply_b_dec_to_input=False),
    case("jumprelu_skip_transcoder", "jumprelu_skip_transcoder", d_out=D_OUT, apply_b_dec_to_input=False),
    case("transcoder_layer_norm", "transcoder", d_out=D_OUT, apply_b_dec_to_input=False,
         normalize_activations="layer_norm"),
]


@torch.no_grad()
def fill(sae, seed: int) -> None:
    """Random, non-trivial weights: decoder rows of uneven norm, biases, thresholds near the
    pre-activations so that some features fire and some do not."""
    gen = torch.Generator().manual_seed(seed)
    for name, p in sorted(sae.named_parameters()):
        shape = p.shape
        if name == "threshold":
            v = torch.rand(shape, generator=gen) * 0.6
        elif name == "W_dec":
            v = torch.randn(shape, generator=gen) * (0.5 + torch.rand(shape[0], 1, generator=gen))
        elif name.startswith("W_"):
            v = torch.randn(shape, generator=gen) / shape[-1] ** 0.5
        else:
            v = torch.randn(shape, generator=gen) * 0.2
        p.copy_(v.to(p.dtype))


def main() -> None:
    for i, (name, cfg, x_shape) in enumerate(CASES):
        folder = HERE / name
        shutil.rmtree(folder, ignore_errors=True)
        sae = SAE.from_dict(cfg)
        fill(sae, seed=100 + i)
        sae.eval()
        sae.save_model(folder)
        x = torch.randn(x_shape, generator=torch.Generator().manual_seed(i)) * 2
        with torch.no_grad():
            acts = sae.encode(x)
            dec = sae.decode(acts)
            fwd = sae.forward(x)
        save_file({"x": x, "encode": acts.contiguous(), "decode": dec.contiguous(), "forward": fwd.contiguous()},
                  str(folder / "outputs.safetensors"))
        print(f"{name}: {type(sae).__name__} encode {tuple(acts.shape)} forward {tuple(fwd.shape)} {fwd.dtype}")
    (HERE / "VERSION").write_text(f"sae-lens {sae_lens.__version__}, torch {torch.__version__}\n")


if __name__ == "__main__":
    main()
