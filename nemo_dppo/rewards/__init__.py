"""Rule-based rewards for verifiable tasks (math: `nemo_dppo.rewards.math_reward`)."""

from nemo_dppo.rewards.math_reward import MathReward, check_answer, extract_boxed, math_verify_reward

__all__ = ["MathReward", "check_answer", "extract_boxed", "math_verify_reward"]
