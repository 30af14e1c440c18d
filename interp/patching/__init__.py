"""Activation patching sweeps: which activations of a clean run restore its behaviour in a
corrupt run?

Each experiment runs the *corrupt* prompt with one site's activation replaced by the *clean*
run's (denoising) and scores the output with a metric, normalised so that 0 is the corrupt run
and 1 the clean run: ``(m - m_corrupt) / (m_clean - m_corrupt)``. Sweeps (``kind=``, ``kinds=``):

==================  =======================  =============================================
kind                values                   one experiment patches
==================  =======================  =============================================
``resid_pre``       ``[layers, positions]``  ``blocks.{L}.resid_pre`` at one position
``resid_mid``       ``[layers, positions]``  ``blocks.{L}.resid_mid`` at one position
``resid_post``      ``[layers, positions]``  ``blocks.{L}.resid_post`` at one position
``attn.out``        ``[layers, positions]``  ``blocks.{L}.attn.out`` at one position
``mlp.out``         ``[layers, positions]``  ``blocks.{L}.mlp.out`` at one position
``attn.z``          ``[layers, heads]``      head h of ``blocks.{L}.attn.z`` at every position
``attn.z_by_pos``   ``[layers, heads, pos]`` head h of ``blocks.{L}.attn.z`` at one position
==================  =======================  =============================================

:func:`patch_sweep` runs one sweep and returns a :class:`PatchingResult`; :func:`patch_sweeps`
runs several in the same batches and returns ``{name: PatchingResult}``.

How it is fast (see docs/design.md, "Speed by design"). An experiment that patches position ``p``
of layer ``L`` leaves every layer below ``L`` and every position before ``p`` exactly as in the
corrupt run. So experiments are grouped by ``p``; the group's rows run only the tokens
``p .. last metric position``, attend to the corrupt run's cached keys and values of the
tokens before ``p`` (a frozen :class:`~interp.model.KVCache`), and step through the layers together as a
*wavefront*: at layer ``L`` the rows of the experiments patching layer ``L`` join the batch,
starting from the corrupt run's cached ``resid_pre`` of layer ``L``, and a hook patches each
joining row at its own site. Nothing is computed twice, each layer's weights are read once per
group for a batch of every experiment that has reached it, and logits are computed only at the
metric's positions (only the vocabulary entries it reads, for a logit difference). A full
``resid_pre`` sweep costs about ``layers * positions / 4`` forwards' worth of arithmetic (the
minimum for exact patching) in at most ``positions`` batched passes, instead of
``layers * positions`` forwards. Experiments known to change nothing are not run: a clean value
equal to the corrupt one (every site before the first token where the prompts differ) or a
patch after the last metric position (``PatchingResult.skipped`` counts them); an all-position
head patch starts at the first position where the head's output differs. On a CPU, groups
with few tokens are merged into one pass (see :data:`MERGE_TOKEN_ROWS`). Results equal a naive
loop of one patched forward per experiment to fp32 rounding (``tests/analysis/test_patching.py``).

>>> import torch
>>> from interp.model import Gemma3, Gemma3Config
>>> from interp.metrics import logit_diff
>>> m = Gemma3.from_config(Gemma3Config(n_layers=2, d_model=32, d_mlp=64, n_heads=2,
...     n_kv_heads=1, d_head=16, vocab_size=50), seed=0)
>>> r = patch_sweep(m, [2, 5, 7, 9], [2, 6, 7, 9], logit_diff(3, 4), progress=False)
>>> r.values.shape, r.axes
(torch.Size([2, 4]), ('layer', 'pos'))
>>> float(r.values[0, 0]), round(float(r.values[0, 1]), 4)  # same token at 0; the changed token at 1
(0.0, 1.0)
"""

from .experiments import POSITION_SITES, SWEEPS, check_kinds, site_of
from .pair import PromptPair, make_result, prepare_pair
from .result import Comparison, PatchingResult, compare
from .sweep import patch_sweep, patch_sweeps

# the sweeps, their results, and what other analyses build on (a prepared prompt pair, a sweep's
# site names, a result from values); the planning and the wavefront stay in their modules
__all__ = ["patch_sweep", "patch_sweeps", "PatchingResult", "Comparison", "compare", "SWEEPS", "POSITION_SITES",
           "check_kinds", "site_of", "prepare_pair", "make_result", "PromptPair"]
