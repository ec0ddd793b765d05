"""NF4 through real bitsandbytes: round trip error and what double quantization saves."""

import bitsandbytes.functional as bnbf
import torch


def _stats_bytes(state) -> int:
    total = state.absmax.numel() * state.absmax.element_size()
    if state.nested:
        total += state.state2.absmax.numel() * state.state2.absmax.element_size()
        total += state.state2.code.numel() * state.state2.code.element_size()
    return total


def test_nf4_round_trip_error_is_small_and_exact_on_codebook():
    torch.manual_seed(0)
    weight = torch.randn(512, 256) * 0.02
    packed, state = bnbf.quantize_4bit(weight, blocksize=64, quant_type="nf4", compress_statistics=True)
    restored = bnbf.dequantize_4bit(packed, state)
    assert packed.numel() == weight.numel() // 2  # two 4-bit codes per byte
    relative = (restored - weight).norm() / weight.norm()
    assert relative < 0.12, relative
    # Dequantized values are fixed points of the quantizer: quantizing them again changes nothing.
    again = bnbf.dequantize_4bit(
        *bnbf.quantize_4bit(restored, blocksize=64, quant_type="nf4", compress_statistics=True)
    )
    assert torch.allclose(again, restored, atol=1e-3)


def test_double_quant_statistics_are_smaller_than_single():
    weight = torch.randn(1024, 1024) * 0.02
    _, single = bnbf.quantize_4bit(weight, blocksize=64, quant_type="nf4", compress_statistics=False)
    _, double = bnbf.quantize_4bit(weight, blocksize=64, quant_type="nf4", compress_statistics=True)
    single_bytes, double_bytes = _stats_bytes(single), _stats_bytes(double)
    # fp32 absmax per 64-weight block = 0.5 bit/param; 8-bit absmax + fp32 per 256 blocks ≈ 0.127.
    assert single_bytes * 8 / weight.numel() == 0.5
    assert double_bytes * 8 / weight.numel() < 0.14
    assert double_bytes < single_bytes / 3.5
