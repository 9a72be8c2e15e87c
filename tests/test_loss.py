"""The distillation loss: TRL's chunked divergence over hidden states equals the reference
generalised JSD on full logits, and its memory does not grow with the number of tokens."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from trainers.loss import CPU_TOKEN_SLICE, Head, generalized_jsd, token_divergence

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("beta", [0.0, 0.3, 0.5, 1.0])
def test_chunked_equals_the_reference_loss_and_gradients(beta):
    """Student and teacher of different widths and padded head sizes (Qwen2.5 3B vs 7B style), only the
    tokenizer's rows used; more tokens than one CPU slice; a bias and a soft-cap on one side."""
    g = torch.Generator().manual_seed(1)
    n, vocab = CPU_TOKEN_SLICE + 37, 700
    hs = torch.randn(n, 16, generator=g, requires_grad=True)
    ht = torch.randn(n, 24, generator=g)
    ws = torch.nn.Parameter(torch.randn(vocab + 9, 16, generator=g) * 0.3)
    bs = torch.nn.Parameter(torch.randn(vocab + 9, generator=g) * 0.1)
    wt = torch.randn(vocab + 20, 24, generator=g) * 0.3
    s_head, t_head = Head(ws, bs), Head(wt, None, scale=1.3, softcap=7.0)

    chunked = token_divergence(hs, s_head, ht, t_head, beta, vocab)
    reference = generalized_jsd(s_head.logits(hs, vocab), t_head.logits(ht, vocab), beta)
    assert chunked.shape == (n,)
    assert torch.allclose(chunked, reference, rtol=1e-5, atol=1e-7)
    assert chunked.sum().item() == pytest.approx(reference.sum().item(), rel=1e-5)

    grads = torch.autograd.grad(chunked.sum(), [hs, ws, bs])
    ref_grads = torch.autograd.grad(reference.sum(), [hs, ws, bs])
    for got, want in zip(grads, ref_grads, strict=True):
        assert torch.allclose(got, want, rtol=1e-4, atol=1e-6)
    assert grads[1][vocab:].abs().max() == 0  # padding rows past the tokenizer get no gradient


def test_no_tokens_no_loss():
    h = torch.zeros(0, 8, requires_grad=True)
    out = token_divergence(h, Head(torch.randn(10, 8), None), torch.zeros(0, 8), Head(torch.randn(10, 8), None), 0.5, 10)
    assert out.shape == (0,)


PROBE = """
import resource, sys, torch
torch.set_num_threads(2)
from trainers.loss import Head, token_divergence
n, vocab, h = int(sys.argv[1]), int(sys.argv[2]), 64
g = torch.Generator().manual_seed(0)
hs = torch.randn(n, h, generator=g).requires_grad_(True)
ht = torch.randn(n, h, generator=g)
ws = torch.nn.Parameter(torch.randn(vocab + 128, h, generator=g) * 0.05)
wt = torch.randn(vocab + 256, h, generator=g) * 0.05
base = int(open("/proc/self/statm").read().split()[1]) * 4096
token_divergence(hs, Head(ws, None), ht, Head(wt, None), 0.5, vocab).sum().backward()
print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base) / 2**30)
"""


def _peak_gb(n: int, vocab: int) -> float:
    """Peak resident memory added by one forward + backward, in a fresh process. glibc's dynamic mmap
    threshold is pinned so every large buffer is mapped and unmapped exactly (no heap reuse hiding or
    inflating the peak)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "MALLOC_MMAP_THRESHOLD_": "65536", "OMP_NUM_THREADS": "2"}
    out = subprocess.run([sys.executable, "-c", PROBE, str(n), str(vocab)], capture_output=True, text=True,
                         env=env, cwd=ROOT, timeout=300, check=True)
    return float(out.stdout.strip())


@pytest.mark.slow
def test_loss_memory_is_flat_in_tokens_and_bounded_by_one_tile():
    """16k completion tokens cost what 2k do (vocabulary scaled down to 4096 to keep the test short), and
    a full-width vocabulary tile (32768 columns of a 36864-token vocabulary; 152k only adds tiles, not
    memory) stays far under 4 GB. The N x V logits of the reference at 16k x 152k would be ~9 GB each."""
    small, many = _peak_gb(2048, 4096), _peak_gb(16384, 4096)
    assert many <= small * 1.15 + 0.05, (small, many)
    wide = _peak_gb(2048, 36864)
    assert wide < 4.0, wide
