"""Parallel training backends, applied to a single-device model from outside (imported only by sala_train.train).

    deepspeed.py         DeepSpeed ZeRO stages 1, 2, 3 (optional CPU offload, bf16), built around our muP AdamW groups
    megatron.py          tensor parallel (megatron-core's parallel layers and process groups) x our context parallel
    context_parallel.py  zigzag split, LASP-2 lightning and gathered-K/V sparse attention over a CP group, CP loss

The optional stacks are imported lazily inside these modules: importing this package needs neither.
"""
