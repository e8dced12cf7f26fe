"""Small hand-written HF config.json dicts, one per family the planner reads.

The other plan tests load HF_CONFIGS with runpy, so it works whether or not tests/ is a package.
"""


HF_CONFIGS = {
    "llama": dict(
        model_type="llama", vocab_size=1000, hidden_size=256, intermediate_size=688,
        num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=2,
        max_position_embeddings=2048, tie_word_embeddings=False,
    ),
    "qwen2": dict(  # Qwen2.5-style: GQA, untied
        model_type="qwen2", vocab_size=1500, hidden_size=256, intermediate_size=512,
        num_hidden_layers=3, num_attention_heads=8, num_key_value_heads=4,
        max_position_embeddings=4096, tie_word_embeddings=False,
    ),
    "qwen3": dict(
        model_type="qwen3", vocab_size=1500, hidden_size=256, intermediate_size=512, head_dim=64,
        num_hidden_layers=3, num_attention_heads=8, num_key_value_heads=2, tie_word_embeddings=True,
    ),
    "qwen3_moe": dict(
        model_type="qwen3_moe", vocab_size=1500, hidden_size=256, intermediate_size=768,
        moe_intermediate_size=128, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=2,
        head_dim=32, num_experts=16, num_experts_per_tok=4, decoder_sparse_step=1, mlp_only_layers=[],
    ),
    "mixtral": dict(
        model_type="mixtral", vocab_size=1000, hidden_size=256, intermediate_size=512,
        num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=2, num_local_experts=8,
        num_experts_per_tok=2,
    ),
    "deepseek_v3": dict(
        model_type="deepseek_v3", vocab_size=1000, hidden_size=256, intermediate_size=512,
        moe_intermediate_size=64, num_hidden_layers=4, num_attention_heads=4, q_lora_rank=64,
        kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=16, v_head_dim=16,
        n_routed_experts=32, n_shared_experts=1, num_experts_per_tok=4, first_k_dense_replace=1,
        n_group=4, topk_group=2, num_nextn_predict_layers=1,
    ),
}


def test_every_family_has_a_config():
    assert set(HF_CONFIGS) == {"llama", "qwen2", "qwen3", "qwen3_moe", "mixtral", "deepseek_v3"}
