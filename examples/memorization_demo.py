"""A self-contained demo of the memorization metric (no dataset needed).

A "training set" of random 3x16x16 images; "generated samples" that are exact copies,
slightly noisy copies and fresh images. diffmem finds which ones are memorized.
"""
import time

import torch

from diffmem import memorization

gen = torch.Generator().manual_seed(0)
train = torch.randint(0, 256, (5000, 3, 16, 16), dtype=torch.uint8, generator=gen)
copies = train[:300]
noisy = (train[300:600].short() + torch.randint(-3, 4, (300, 3, 16, 16), generator=gen)).clamp(0, 255).byte()
fresh = torch.randint(0, 256, (400, 3, 16, 16), dtype=torch.uint8, generator=gen)
samples = torch.cat([copies, noisy, fresh])

start = time.perf_counter()
report = memorization.evaluate(samples, train)
elapsed = time.perf_counter() - start
print(report.summary())
print(f"expected 600/1000 memorized (300 copies + 300 noisy copies); searched in {elapsed:.3f} s")
