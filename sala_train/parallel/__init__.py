"""Parallel training backends, applied to a single-device model from outside (imported only by sala_train.train).

    deepspeed.py   DeepSpeed ZeRO stages 1, 2, 3 (optional CPU offload, bf16), built around our muP AdamW groups

The optional stacks are imported lazily inside these modules: importing this package needs neither.
"""
