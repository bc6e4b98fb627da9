"""The Qwen2.5-VL shapes `bench model --shapes` builds (the hub's config.json of the 3B and 7B, and a tiny one for
the tests), as transformers 5's nested config.json. Read by `bench.qwen` (the Qwen) and `bench.configs` (the LaVi of
its decoder)."""
from __future__ import annotations

from lavi.qwenvl.config import QWEN2_5_VL

# the hub's Qwen2.5-VL config.json shapes (3B, 7B), and a tiny one for the tests
_VISION = dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, patch_size=14, spatial_merge_size=2,
               temporal_patch_size=2, window_size=112, fullatt_block_indexes=[7, 15, 23, 31], tokens_per_second=2,
               in_channels=3)
_TEXT_3B = dict(vocab_size=151936, hidden_size=2048, intermediate_size=11008, num_hidden_layers=36,
                num_attention_heads=16, num_key_value_heads=2, max_position_embeddings=128000, rms_norm_eps=1e-6,
                tie_word_embeddings=True)
_TEXT_7B = dict(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                num_attention_heads=28, num_key_value_heads=4, max_position_embeddings=128000, rms_norm_eps=1e-6,
                tie_word_embeddings=False)
_IDS = dict(image_token_id=151655, video_token_id=151656, vision_start_token_id=151652, vision_end_token_id=151653,
            eos_token_id=151645, pad_token_id=151643)
SHAPES = {  # shapes -> (text, vision, special ids, M-RoPE section)
    "qwen2.5-vl-3b": (_TEXT_3B, {**_VISION, "out_hidden_size": 2048}, _IDS, [16, 24, 24]),
    "qwen2.5-vl-7b": (_TEXT_7B, {**_VISION, "out_hidden_size": 3584}, _IDS, [16, 24, 24]),
    "tiny-qwen2.5-vl": (dict(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                             rms_norm_eps=1e-6, tie_word_embeddings=False),
                        dict(depth=2, hidden_size=16, intermediate_size=24, num_heads=2, patch_size=4,
                             spatial_merge_size=2, temporal_patch_size=2, window_size=16, fullatt_block_indexes=[1],
                             tokens_per_second=2, in_channels=3, out_hidden_size=32),
                        dict(image_token_id=290, video_token_id=291, vision_start_token_id=292,
                             vision_end_token_id=293, eos_token_id=294, pad_token_id=295), [2, 1, 1]),
}


def hub_config(shapes: str) -> dict:
    """config.json of `shapes` (transformers 5's nested layout)."""
    text, vision, ids, section = SHAPES[shapes]
    rope = {"rope_type": "default", "rope_theta": 1e6, "mrope_section": section}
    return dict(model_type=QWEN2_5_VL, text_config=dict(text, rope_parameters=rope, eos_token_id=ids["eos_token_id"],
                                                         pad_token_id=ids["pad_token_id"], bos_token_id=None),
                vision_config=vision, tie_word_embeddings=text["tie_word_embeddings"], **ids)
