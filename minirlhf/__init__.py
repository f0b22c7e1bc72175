"""minirlhf: RLHF written by hand so every equation is visible.

Math lives in small pure-tensor modules (ops, gae, ppo, kl, dpo, reward_losses, baselines, lora);
model plumbing in models.py / heads.py / sampling.py; what is read and written on disk (adapters, heads, folder checks)
in formats.py; data in minirlhf.data; the training loops in the top-level scripts.
"""
__version__ = "0.1.0"
