"""sala_train.kernels: stateless ops (lightning attention, InfLLM-V2 sparse attention) with naive references."""
