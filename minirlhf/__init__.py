"""minirlhf: RLHF written by hand so every equation is visible.

Math lives in small pure-tensor modules (ops, gae, ppo, kl, dpo, reward_losses, baselines, lora);
model plumbing in models.py / heads.py / sampling.py; adapter and head files in formats.py, the checks of the folders a
user names in folders.py; the run around a script in run.py; data in minirlhf.data; the training loops in the
top-level scripts.
"""
__version__ = "0.1.0"
