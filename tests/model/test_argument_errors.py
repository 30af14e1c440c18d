"""Arguments a new user gets wrong first: each is accepted in its obvious spelling or refused with a
message that names the fix (not torch's raw error), before anything is allocated."""

from __future__ import annotations

import pytest
import torch
from support import TINY

from interp.model import Gemma3


@pytest.mark.parametrize("name, want", [("bfloat16", torch.bfloat16), ("torch.bfloat16", torch.bfloat16),
                                        ("bf16", torch.bfloat16), ("float32", torch.float32)])
def test_dtype_by_name(name, want):
    assert Gemma3.from_config(TINY, dtype=name).dtype == want


@pytest.mark.parametrize("dtype", ["float16", "half", torch.float16, torch.int8])
def test_unsupported_dtype_names_the_choices(dtype):
    with pytest.raises(ValueError, match=r"torch\.float32.*torch\.bfloat16"):
        Gemma3.from_config(TINY, dtype=dtype)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU: 'cuda' is a valid device here")
def test_cuda_on_a_cpu_machine_says_why():
    with pytest.raises(ValueError, match=r"device 'cuda'.*use device='cpu'"):
        Gemma3.from_config(TINY, device="cuda")


def test_a_device_that_is_no_device():
    with pytest.raises(ValueError, match=r"device 'gpu' is not a device name.*'cpu', 'cuda'"):
        Gemma3.from_config(TINY, device="gpu")


@pytest.mark.parametrize("src", ["dmeo", "Demo", "deom"])
def test_a_typo_of_demo_is_named(src):
    with pytest.raises(FileNotFoundError, match="did you mean 'demo'"):
        Gemma3.from_pretrained(src)
