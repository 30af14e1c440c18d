"""circuit-tracer's side of ``bench/circuit_tracer_check.py``: runs INSIDE the circuit-tracer venv.

It imports nothing from this repository (so it runs under another interpreter, with
circuit-tracer's own torch and transformers 4.x). Given a local Hugging Face Gemma 3 checkpoint
folder and a circuit-tracer transcoder config (``config.yaml`` naming local ``layer_i.safetensors``
files), it adds a tiny word-level tokenizer to the folder if there is none (circuit-tracer needs a
tokenizer for its special-token check and to decode the prompt), builds circuit-tracer's
``ReplacementModel`` with the nnsight backend on the CPU, runs ``circuit_tracer.attribute`` on the
given token ids and logit tokens, and writes the graph to a safetensors file (no pickle):
``adjacency [n, n]`` (row = target, column = source), ``active_features [k, 3]`` (layer, pos,
feature), ``activation_values [k]``, ``logit_ids``, ``input_tokens``, ``real_logits`` (the model's
last-position logits), and metadata ``timing`` (JSON: load and attribution seconds, versions).

Usage (paths are the checker's; it calls this with ``/work/ctvenv/bin/python``)::

    HF_HUB_OFFLINE=1 python bench/ct_side.py --model DIR --transcoders DIR/config.yaml \\
        --prompt 2,17,33 --logits 5,9 --out graph.safetensors
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")


def ensure_tokenizer(folder: Path, vocab_size: int) -> None:
    """Write a word-level tokenizer (``<pad>`` 0, ``<eos>`` 1, ``<bos>`` 2, then ``t3`` ...) into
    ``folder`` unless it has one: token ids pass through unchanged, and decoding works."""
    if (folder / "tokenizer.json").exists():
        return
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<eos>": 1, "<bos>": 2}
    vocab.update({f"t{i}": i for i in range(3, vocab_size)})
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>",
                                   pad_token="<pad>", unk_token="<pad>")
    fast.save_pretrained(str(folder))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="local Hugging Face checkpoint folder (Gemma3ForCausalLM)")
    p.add_argument("--transcoders", required=True, help="circuit-tracer transcoder config.yaml (local paths)")
    p.add_argument("--prompt", required=True, help="comma-separated token ids (start with BOS)")
    p.add_argument("--logits", required=True, help="comma-separated logit token ids")
    p.add_argument("--out", required=True, help="output .safetensors")
    p.add_argument("--batch", type=int, default=64, help="circuit-tracer batch_size")
    args = p.parse_args(argv)

    import torch
    import yaml

    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    folder = Path(args.model)
    cfg = json.loads((folder / "config.json").read_text())
    ensure_tokenizer(folder, int(cfg["vocab_size"]))

    import circuit_tracer
    import nnsight
    import transformers
    from circuit_tracer import ReplacementModel, attribute
    from circuit_tracer.utils.hf_utils import load_transcoders
    from safetensors.torch import save_file

    device = torch.device("cpu")
    t0 = time.perf_counter()
    config = yaml.safe_load(Path(args.transcoders).read_text())
    transcoders = load_transcoders(config, device=device, dtype=torch.float32, lazy_encoder=False,
                                   lazy_decoder=False)
    model = ReplacementModel.from_pretrained_and_transcoders(str(folder), transcoders, backend="nnsight",
                                                             device=device, dtype=torch.float32)
    t_load = time.perf_counter() - t0

    ids = torch.tensor([int(x) for x in args.prompt.split(",")])
    logit_ids = torch.tensor([int(x) for x in args.logits.split(",")])
    t0 = time.perf_counter()
    graph = attribute(ids, model, attribution_targets=logit_ids, batch_size=args.batch, verbose=False)
    t_attr = time.perf_counter() - t0
    # a second, timed-only run (the first pays nnsight's one-time source parsing and tracing setup)
    t0 = time.perf_counter()
    attribute(ids, model, attribution_targets=logit_ids, batch_size=args.batch, verbose=False)
    t_attr2 = time.perf_counter() - t0

    real_logits, _ = model.get_activations(ids)
    tensors = {
        "adjacency": graph.adjacency_matrix.float().contiguous(),
        "active_features": graph.active_features.long().contiguous(),
        "activation_values": graph.activation_values.float().contiguous(),
        "selected_features": graph.selected_features.long().contiguous(),
        "logit_ids": torch.tensor([t.vocab_idx for t in graph.logit_targets]).long(),
        "input_tokens": graph.input_tokens.long().cpu().contiguous(),
        "real_logits": real_logits[0, -1].float().contiguous(),
    }
    timing = {"load_s": t_load, "attribute_s": t_attr, "attribute_again_s": t_attr2,
              "circuit_tracer": circuit_tracer.__version__, "nnsight": nnsight.__version__,
              "transformers": transformers.__version__, "torch": torch.__version__,
              "zero_positions": str(model.zero_positions), "skip": bool(model.skip_transcoder),
              "feature_input_hook": transcoders.feature_input_hook,
              "feature_output_hook": transcoders.feature_output_hook}
    save_file(tensors, args.out, metadata={"timing": json.dumps(timing)})
    print(json.dumps(timing))
    return 0


if __name__ == "__main__":
    sys.exit(main())
