"""Test-wide settings: one intra-op thread (the models are tiny; two threads on a two-core CI
machine only add synchronisation overhead) and float64-friendly defaults."""

from __future__ import annotations

import torch

torch.set_num_threads(1)
