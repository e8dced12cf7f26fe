"""Small random configurations shared by the model tests."""

from moeco import ModelConfig


def micro_config(**overrides) -> ModelConfig:
    """A seconds-fast DeepSeek-V3-shaped config: 3 layers (1 dense), 8 experts in 4 groups, MTP."""
    base = dict(
        vocab_size=256, hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
        num_hidden_layers=3, num_attention_heads=4, q_lora_rank=32, kv_lora_rank=16,
        qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16, n_routed_experts=8,
        n_shared_experts=1, num_experts_per_tok=3, first_k_dense_replace=1, n_group=4, topk_group=2,
        max_position_embeddings=256, initializer_range=0.05, num_nextn_predict_layers=1,
    )
    base.update(overrides)
    return ModelConfig(**base)


def sharp_attention(model, std: float = 0.5, seed: int = 0):
    """Redraw every attention projection with a large std so attention rows are peaked (mean entropy
    well below uniform's): with small random weights attention is near uniform and hides RoPE,
    mask and softmax-scale errors. Returns the model."""
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            attn = getattr(module, "self_attn", None)
            if attn is None:
                continue
            for p in attn.parameters():
                if p.dim() == 2:
                    p.copy_(torch.randn(p.shape, generator=g) * std)
    return model
