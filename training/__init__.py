"""DPO, reward-model and PPO training for VLMs on SPA-VL, and the safety/helpfulness evaluation.

Not built yet: this package is the home of issue 5 (see the README's roadmap).
"""
