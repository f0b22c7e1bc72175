"""minirlhf: RLHF written by hand so every equation is visible.

The math: small pure-tensor modules, one idea each (gae, ppo, grpo, reinforce, kl, dpo, reward_losses, baselines,
token_rewards, mismatch, ops, best_of_n, lora). The model plumbing: models, heads (log-probs, values, scores),
sampling (the sampler), precision, padding; where a model comes from (hub),
k-bit bases (quantization), adapter and head files (formats), the checks of the folders a user names (folders); the speed machinery, behind a switch each, in minirlhf.fast. An RL
iteration's shared steps: roles (policy, reward, reference on one base), rollout (prompts, sampling, log-prob passes,
minibatches), report (evaluation, logging, the summary). The settings the scripts share: settings; the flags: cli.
Data: minirlhf.data; the embedded model and SmolLM2: minirlhf.assets. The training loops: the top-level scripts.
"""
__version__ = "0.1.0"
