"""Local vision-language models: one chat format, one loader, one in-process generator.

- ``builder.vlm.chat``: messages → token ids, the same for training, evaluate and the pipeline
  (``ChatFormat``, ``load_processor``);
- ``builder.vlm.loading``: a folder, Hub id or LoRA adapter folder → model and processor (``load_vlm``,
  ``resolve_dtype``, ``adapter_base``);
- ``builder.vlm.local``: the in-process model that answers and scores choices (``LocalVLM``,
  ``load_local_vlm``), behind the pipeline's local backend and evaluate's answers.
"""
