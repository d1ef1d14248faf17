"""onetrans-mini: OneTrans, the unified Transformer for industrial ranking, small enough to read."""

__version__ = "0.1.0"

# the model library (tokenizers -> mixed-parameter blocks -> OneTrans)
from .attention import AttentionMap, MixedAttention, attention_mask, capture_attention, explicit_attention  # noqa: E402
from .config import ModelConfig, get_preset  # noqa: E402
from .layers import MixedFFN, MixedLinear, RMSNorm  # noqa: E402
from .model import OneTrans, OneTransBlock, pyramid_schedule  # noqa: E402
from .tokenizer import (  # noqa: E402
    AutoSplitNSTokenizer,
    FeatureEmbeddings,
    GroupWiseNSTokenizer,
    SequenceTokenizer,
    Tokenizer,
    n_ns_tokens,
    n_s_tokens,
)
