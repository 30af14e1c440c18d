"""A hook with the wrong signature is refused when it is registered, with the calling convention."""

from __future__ import annotations

import pytest
import torch


def test_one_argument_hook_names_the_convention(tiny_model):
    with pytest.raises(TypeError, match=r"hooks are called fn\(x, site\)"):
        tiny_model.run_with_hooks(torch.tensor([[1, 2]]), [("embed", lambda x: x)])
    assert not tiny_model.registry.active


def test_hooks_with_defaults_or_varargs_are_accepted(tiny_model):
    seen = []
    tiny_model.run_with_hooks(torch.tensor([[1, 2]]), [("embed", lambda x, site, extra=1: seen.append(extra)),
                                                       ("blocks.0.resid_post", lambda *a: seen.append(len(a)))])
    assert seen == [1, 2]
