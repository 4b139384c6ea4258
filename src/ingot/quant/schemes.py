"""Quantization schemes: what a linear's weight (and, at run time, its input) is cast to.

A scheme is a frozen dataclass; string presets name the common ones (``Scheme.from_name("int8-block")``).
The numbers live in ``quant/ref.py``; the on-disk layouts live in ``ingot.formats``.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Literal

WeightDtype = Literal["bf16", "fp8_e4m3", "int8", "int4"]
# How weight scales are laid out over a [N, K] weight:
#   block   - one scale per block_size[0] x block_size[1] tile, grid [cdiv(N, bn), cdiv(K, bk)]
#   channel - one scale per output row, [N, 1]
#   group   - one scale per row per group_size columns, [N, cdiv(K, g)]
#   none    - no scale (bf16)
Granularity = Literal["block", "channel", "group", "none"]
# Dynamic activation quantization at run time: per token per group of act_group_size, per token, or none (A16).
ActGranularity = Literal["group", "token", "none"]
ScaleFmt = Literal["float", "ue8m0"]

# Largest representable magnitude of each quantized weight type: a scale is amax / QMAX.
# int4 symmetric uses [-8, 7] with scale amax / 7.5 (GPTQ's and compressed-tensors' convention:
# -amax lands on -8, +amax rounds to 8 and clamps to 7, so every error stays within scale / 2).
QMAX = {"fp8_e4m3": 448.0, "int8": 127.0, "int4": 7.5}
QRANGE = {"int8": (-127, 127), "int4": (-8, 7)}


@dataclass(frozen=True)
class Scheme:
    name: str
    weight: WeightDtype
    granularity: Granularity
    block_size: tuple[int, int] = (128, 128)
    group_size: int = 128
    activation: ActGranularity = "none"
    act_group_size: int = 128
    scale_fmt: ScaleFmt = "float"

    def __post_init__(self) -> None:
        if self.weight == "bf16" and self.granularity != "none":
            raise ValueError(f"scheme {self.name}: bf16 weights take granularity 'none', got {self.granularity!r}")
        if self.weight != "bf16" and self.granularity == "none":
            raise ValueError(f"scheme {self.name}: {self.weight} weights need a scale granularity")
        if self.scale_fmt == "ue8m0" and self.weight != "fp8_e4m3":
            raise ValueError(f"scheme {self.name}: scale_fmt 'ue8m0' is defined for fp8 only, not {self.weight}")
        if any(b <= 0 for b in self.block_size) or self.group_size <= 0 or self.act_group_size <= 0:
            raise ValueError(f"scheme {self.name}: block and group sizes must be positive")

    @property
    def is_quantized(self) -> bool:
        return self.weight != "bf16"

    @property
    def kind(self) -> str:
        """The stored kind (a format-level name): fp8-block-ue8m0 is stored as fp8-block with power-of-two scales."""
        return self.name.removesuffix("-ue8m0")

    @property
    def bits(self) -> int:
        return {"bf16": 16, "fp8_e4m3": 8, "int8": 8, "int4": 4}[self.weight]

    @classmethod
    def from_name(cls, name: str) -> "Scheme":
        try:
            return PRESETS[name]
        except KeyError:
            raise ValueError(f"unknown scheme {name!r}; expected one of: {', '.join(PRESETS)}") from None

    def with_scale_fmt(self, scale_fmt: ScaleFmt) -> "Scheme":
        name = self.name.removesuffix("-ue8m0") + ("-ue8m0" if scale_fmt == "ue8m0" else "")
        return replace(self, name=name, scale_fmt=scale_fmt)


PRESETS: dict[str, Scheme] = {
    s.name: s
    for s in (
        Scheme("bf16", weight="bf16", granularity="none"),
        Scheme("fp8-block", weight="fp8_e4m3", granularity="block", activation="group"),
        Scheme("fp8-block-ue8m0", weight="fp8_e4m3", granularity="block", activation="group", scale_fmt="ue8m0"),
        Scheme("int8-block", weight="int8", granularity="block", activation="group"),
        Scheme("int8-channel", weight="int8", granularity="channel", activation="token"),
        Scheme("int8-weight", weight="int8", granularity="channel", activation="none"),
        Scheme("int4-group", weight="int4", granularity="group", group_size=128, activation="none"),
    )
}

BF16 = PRESETS["bf16"]
