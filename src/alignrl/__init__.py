"""alignrl: post-train language models with RL and preference optimisation (SFT, RM, PPO, DPO, GRPO)."""

from alignrl.errors import AlignRLError

__version__ = "0.1.0"
__all__ = ["AlignRLError", "__version__"]
