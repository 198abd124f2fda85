import hashlib

import pytest
import torch

from pipeline.quant import bitpack


def reference_pack(codes: list[int], bits: int, block: int) -> bytes:
    """FORMAT.md's layout written as plainly as possible, one code at a time."""
    out = bytearray()
    for b0 in range(0, len(codes), block):
        blk, shift = codes[b0 : b0 + block], 0
        for k in bitpack.plane_widths(bits):
            m = 8 // k
            run = block // m
            plane = bytearray(run)
            for i, c in enumerate(blk):
                s, j = divmod(i, run)
                plane[j] |= ((c >> shift) & ((1 << k) - 1)) << (s * k)
            out += plane
            shift += k
    return bytes(out)


@pytest.mark.parametrize("bits", range(2, 9))
@pytest.mark.parametrize("shape", [(1, 1, 128), (3, 5, 128), (2, 1, 32), (4, 2, 8), (1, 3, 256)])
def test_round_trip(bits, shape):
    g = torch.Generator().manual_seed(bits * 100 + shape[1])
    codes = torch.randint(0, 1 << bits, shape, dtype=torch.uint8, generator=g)
    packed = bitpack.pack(codes, bits)
    assert packed.shape == (*shape[:-1], shape[-1] * bits // 8)
    assert torch.equal(bitpack.unpack(packed, bits, shape[-1]), codes)
    assert packed.reshape(-1).numpy().tobytes() == reference_pack(codes.reshape(-1).tolist(), bits, shape[-1])


# sha256 prefixes of the packed bytes of a fixed code pattern, frozen when the layout was defined (format v1).
GOLDEN = {
    2: "cdd079d4e053814c", 3: "addf07cefb389b59", 4: "babd8b1a2b39cf6b", 5: "9d896ba3ab74bf7c",
    6: "a3829f47e0d04ce0", 7: "845bac3eb405e514", 8: "7b46099da621efca",
}  # fmt: skip


@pytest.mark.parametrize("bits", range(2, 9))
def test_golden_bytes(bits):
    codes = ((torch.arange(256) * 37 + 11) % (1 << bits)).to(torch.uint8).reshape(2, 128)
    assert hashlib.sha256(bitpack.pack(codes, bits).numpy().tobytes()).hexdigest()[:16] == GOLDEN[bits]


def test_q5_first_bytes_by_hand():
    # Codes 0..31 repeated: byte 0 of the nibble plane = low4(code 0) | low4(code 64) << 4 = 0 | 0 << 4;
    # byte 1 = 1 | (65 % 32 = 1) << 4 = 0x11; high-bit plane byte j bit s = bit 4 of code j + 16 s.
    codes = (torch.arange(128) % 32).to(torch.uint8).reshape(1, 128)
    p = bitpack.pack(codes, 5)[0].tolist()
    assert p[:3] == [0x00, 0x11, 0x22]
    assert p[64] == 0b10101010  # code j=0 + 16 s: 0,16,32,48,... -> bit4 alternates 0,1,0,1...


def test_rejects_bad_input():
    with pytest.raises(TypeError):
        bitpack.pack(torch.zeros(1, 128, dtype=torch.int32), 5)
    with pytest.raises(ValueError):
        bitpack.unpack(torch.zeros(1, 79, dtype=torch.uint8), 5, 128)
    with pytest.raises(ValueError):
        bitpack.plane_widths(9)
