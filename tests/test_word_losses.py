"""shapes.word_losses: the diagnostic behind the card's account of a VLoRA trained from scratch."""
from __future__ import annotations

import json

import pytest
import torch

from lavi.core import checkpoint
from lavi.core.model import LaVi
from lavi.tiny_models import save_word_tokenizer, tiny_shapes_config
from shapes.spec import vocabulary
from shapes.word_losses import main, word_losses


def test_word_losses_tell_an_image_blind_model_and_words_that_collapsed(tmp_path):
    """Guards against a diagnostic that cannot fail: an untrained VLoRA (B at zero) is blind to its image, so each
    group's loss must equal its loss with the images swapped, exactly; colour words given one embedding must read
    as collapsed (cosine 1) and the others not; once B is not zero, swapping the images must change the losses."""
    tok = save_word_tokenizer(vocabulary(), tmp_path / "m")
    torch.manual_seed(0)
    model = LaVi(tiny_shapes_config(tok.get_vocab_size(), "vlora"))
    embed = model.decoder.embed_tokens.weight
    colours = [tok.token_to_id(w) for w in ("red", "green", "blue", "yellow")]
    with torch.no_grad():
        embed[colours] = embed[colours[0]].clone()
    checkpoint.save(model, tmp_path / "m")
    blind = word_losses(str(tmp_path / "m"), images=4)["groups"]
    assert blind["colour"]["embedding_cosine"] == pytest.approx(1.0)
    assert blind["shape"]["embedding_cosine"] < 0.5 and blind["colour"]["targets"] > 0
    assert all(g["loss"] == g["loss_image_swapped"] for g in blind.values() if g["targets"])
    with torch.no_grad():
        for b in model.vlora.B.values():
            torch.nn.init.normal_(b, std=0.5)
    checkpoint.save(model, tmp_path / "m")
    main([str(tmp_path / "m"), "--images", "4", "--out", str(tmp_path / "w.json")])
    seeing = json.loads((tmp_path / "w.json").read_text())["results"][0]["groups"]
    assert any(g["loss"] != g["loss_image_swapped"] for g in seeing.values() if g["targets"])
