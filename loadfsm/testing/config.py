"""The one config every reference model is built from, and the named configs."""

from __future__ import annotations

from dataclasses import dataclass, replace


@dataclass(frozen=True)
class ModelConfig:
    """Shapes and options of a Llama-style decoder (dense or mixture-of-experts).

    ``head_dim`` defaults to ``hidden_size // num_heads``; it is resolved in
    ``__post_init__``, so ``dataclasses.replace`` keeps the resolved value unless
    the call passes ``head_dim=None`` to recompute it.

    Checkpoints hold ``vocab_size`` embedding rows; the model holds ``padded_vocab``
    (``vocab_size`` rounded up to a multiple of ``pad_vocab_to``) and the loader
    zero-fills the rest.
    """

    vocab_size: int = 4096
    hidden_size: int = 512
    intermediate_size: int = 1408
    num_layers: int = 4
    num_heads: int = 8
    num_kv_heads: int = 4
    head_dim: int | None = None
    rms_eps: float = 1e-5
    rope_theta: float = 10000.0
    max_seq_len: int = 256          # rows of the rotary cos/sin tables
    tie_embeddings: bool = False
    pad_vocab_to: int = 1           # 1: no padding
    num_experts: int = 0            # 0: dense MLP
    experts_per_token: int = 0
    moe_intermediate_size: int = 0
    kv_cache_scales: bool = False   # the checkpoint carries k/v/q scales
    fp8_kv_cache: bool = False      # attention round-trips q/k/v through fp8 with those scales

    def __post_init__(self):
        positive = ("vocab_size", "hidden_size", "intermediate_size", "num_layers",
                    "num_heads", "num_kv_heads", "max_seq_len", "pad_vocab_to")
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.rms_eps <= 0 or self.rope_theta <= 0:
            raise ValueError(f"rms_eps and rope_theta must be > 0, got "
                             f"{self.rms_eps} and {self.rope_theta}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads ({self.num_heads}) must be a multiple of "
                             f"num_kv_heads ({self.num_kv_heads})")
        if self.head_dim is None:
            if self.hidden_size % self.num_heads:
                raise ValueError(f"hidden_size ({self.hidden_size}) is not divisible by "
                                 f"num_heads ({self.num_heads}); pass head_dim")
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_heads)
        if self.head_dim < 2 or self.head_dim % 2:
            raise ValueError(f"head_dim must be even (rotary pairs), got {self.head_dim}")
        if self.num_experts < 0:
            raise ValueError(f"num_experts must be >= 0, got {self.num_experts}")
        if self.num_experts:
            if not 1 <= self.experts_per_token <= self.num_experts:
                raise ValueError(f"experts_per_token must be in [1, {self.num_experts}], "
                                 f"got {self.experts_per_token}")
            if self.moe_intermediate_size < 1:
                raise ValueError("moe_intermediate_size must be >= 1 when num_experts > 0, "
                                 f"got {self.moe_intermediate_size}")

    @property
    def padded_vocab(self) -> int:
        """Embedding / lm_head rows in the model: vocab_size rounded up to pad_vocab_to."""
        return -(-self.vocab_size // self.pad_vocab_to) * self.pad_vocab_to

    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0

    @classmethod
    def from_name(cls, name: str) -> "ModelConfig":
        """The named config ``name`` (see ``CONFIGS``).

        Raises:
            ValueError: ``name`` is not a known config.
        """
        try:
            return CONFIGS[name]
        except KeyError:
            raise ValueError(f"unknown model config {name!r}; known: {sorted(CONFIGS)}") from None


def as_config(name_or_config: str | ModelConfig) -> ModelConfig:
    """A ``ModelConfig`` given one or the name of one."""
    if isinstance(name_or_config, ModelConfig):
        return name_or_config
    return ModelConfig.from_name(name_or_config)


_TINY = ModelConfig()  # ~31 MB of bf16
_LLAMA_8B = ModelConfig(vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                        num_layers=32, num_heads=32, num_kv_heads=8, rope_theta=500000.0,
                        max_seq_len=2048)

CONFIGS: dict[str, ModelConfig] = {
    "tiny": _TINY,
    "tiny-moe": replace(_TINY, num_experts=4, experts_per_token=2, moe_intermediate_size=512),
    "tiny-tied": replace(_TINY, tie_embeddings=True),
    "tiny-padded": replace(_TINY, vocab_size=4000, pad_vocab_to=64),
    "llama-8b": _LLAMA_8B,                               # ~16 GB of bf16, for GPU benchmarks
    "llama-8b-4l": replace(_LLAMA_8B, num_layers=4),     # ~3.7 GB: 8B shapes, few layers
}
