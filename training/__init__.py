"""DPO, reward-model and PPO training for VLMs on SPA-VL, and the safety/helpfulness evaluation.

- ``training.config``: one YAML per run, the paper's settings as defaults, CLI overrides;
- ``training.data``: preference rows → trl's conversational vision format, over-long pairs dropped;
- ``training.models``: load a VLM, freeze the vision tower, train the projector, LoRA on the LM;
- ``training.dpo`` (trl ``DPOTrainer``), ``training.reward`` (scalar-head reward model),
  ``training.ppo`` (our minimal PPO), ``training.evaluate`` (HarmEval USR / harm score, HelpEval win rate).
"""
