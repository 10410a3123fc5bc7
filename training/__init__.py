"""DPO, reward-model and PPO training for VLMs on SPA-VL, and the safety/helpfulness evaluation.

- ``training.config``: one YAML per run, the paper's settings as defaults, CLI overrides;
- ``training.data``: preference rows → trl's conversational vision format, over-long pairs dropped;
- ``training.models``: the paper's training mode on a VLM that ``builder.vlm.loading`` loaded: vision
  tower frozen, projector trained, LoRA on the language model;
- ``training.dpo`` (trl ``DPOTrainer``), ``training.reward`` (scalar-head reward model),
  ``training.ppo`` (our minimal PPO), ``training.evaluate`` (HarmEval USR / harm score, HelpEval win rate).
"""
