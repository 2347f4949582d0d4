"""MFU's denominator is the peak of one JAX device: a GPU, a TPU chip from v4 on (one device
per chip), but one TensorCore of a TPU v2 or v3 chip (each core is its own device)."""

from dataclasses import dataclass

import pytest

from neo.flops import device_peak_flops


@dataclass
class FakeDevice:
    device_kind: str
    platform: str = "tpu"


@pytest.mark.parametrize("kind, chip, cores", [("TPU v2", 45e12, 2), ("TPU v3", 123e12, 2), ("TPU v4", 275e12, 1),
                                               ("TPU v5 lite", 197e12, 1), ("TPU v5p", 459e12, 1)])
def test_tpu_peaks_are_per_jax_device(kind, chip, cores):
    peak, source = device_peak_flops(FakeDevice(kind))
    assert peak == pytest.approx(chip / cores) and kind in source


def test_gpu_peaks_and_unknown_devices():
    assert device_peak_flops(FakeDevice("NVIDIA H100 80GB HBM3", "gpu"))[0] == pytest.approx(989e12)
    assert device_peak_flops(FakeDevice("NVIDIA A100-SXM4-40GB", "gpu"), "float32")[0] == pytest.approx(156e12)
    peak, source = device_peak_flops(FakeDevice("Quantum Abacus", "gpu"))
    assert peak != peak and "unknown peak" in source  # NaN: no MFU rather than a wrong one
