"""flux-lora: FLUX.1 [dev] and [schnell] with LoRA adapters, behind Replicate's FLUX LoRA schema."""
