import pytest

import diffmem


@pytest.fixture(params=["native", "native-generic", "reference"])
def backend(request, monkeypatch):
    """Runs a test through each implementation: the native op with its default CPU
    kernel, the native op with the portable uint8 kernel, and the PyTorch reference."""
    monkeypatch.delenv("DIFFMEM_CPU_KERNEL", raising=False)
    if request.param.startswith("native") and not diffmem._native.AVAILABLE:
        pytest.fail(f"native extension failed to load: {diffmem._native.LOAD_ERROR}")
    if request.param == "native-generic":
        monkeypatch.setenv("DIFFMEM_CPU_KERNEL", "generic")
    if request.param == "reference":
        monkeypatch.setattr(diffmem._native, "use_native", lambda op, device: False)
    return request.param
