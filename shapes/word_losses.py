"""Which words of shapes-v1 a LaVi-family model can say, and whether its words are still apart.

    python -m shapes.word_losses MODEL_DIR [MODEL_DIR ...] --out FILE.json

For each model, on the same freshly rendered held-out images (their captions and every question): the mean
next-token loss (nats, teacher-forced) of each word group where the target is one of its words (colours,
shapes, sizes, counts: the answers to "how many", horizontal and vertical places), the same with each item's image
swapped for another item's (the loss the model would have blind to the image: a group whose loss does not rise
did not come from the image), and the mean pairwise cosine of the group's tied input/output embeddings (near 1:
the decoder can no longer tell them apart, whatever the residual stream says). This is how a VLoRA trained from
scratch was found to have lost the colour words (MODEL_CARD.md, "VLoRA").
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from shapes import spec

GROUPS = {"colour": tuple(spec.COLOURS), "shape": spec.SHAPES, "size": tuple(spec.SIZES), "count": spec.NUMBER_WORDS,
          "horizontal": ("left", "right"), "vertical": ("top", "bottom")}


def _losses(model, batch) -> torch.Tensor:
    """(B, T) per-token loss of `batch`'s targets (0 where not scored)."""
    from lavi.training.losses import encode
    from lavi.training.shared_prefix import forward_rows, prefix_kv

    vis = encode(model, batch)
    logits = forward_rows(model, batch.ids, batch.valid, vis, batch.rows, prefix_kv(model, vis))
    nll = F.cross_entropy(logits.float().transpose(1, 2), batch.labels.clamp(min=0), reduction="none")
    return nll * (batch.labels >= 0)


@torch.no_grad()
def word_losses(path: str, images: int = 64, seed: int = 99) -> dict:
    from lavi.core.checkpoint import load
    from lavi.training.collate import Example, collate
    from lavi.serving.tokenizer import Tokenizer
    from shapes.batches import ShapesData

    model, tok = load(path).eval(), Tokenizer(path)
    examples = ShapesData(seed=seed, images=images, videos=0, questions=4, augment=False)(0)
    swapped = [Example(examples[(i + 1) % len(examples)].frames, e.pairs) for i, e in enumerate(examples)]
    batch = collate(examples, model, tok)
    own, blind = _losses(model, batch), _losses(model, collate(swapped, model, tok))
    embed = model.decoder.embed_tokens.weight
    out = {"model": path, "images": images, "seed": seed, "tied_embeddings": model.config.decoder.tie_word_embeddings,
           "groups": {}}
    for group, words in GROUPS.items():
        ids = [tok.encode(w)[0] for w in words]
        at = torch.isin(batch.labels, torch.tensor(ids))
        e = F.normalize(embed[ids].float(), dim=-1)
        cos = e @ e.T
        out["groups"][group] = {
            "words": list(words), "targets": int(at.sum()),
            "loss": float(own[at].mean()) if at.any() else None,
            "loss_image_swapped": float(blind[at].mean()) if at.any() else None,
            "embedding_cosine": float(cos[~torch.eye(len(ids), dtype=torch.bool)].mean())}
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("models", nargs="+")
    ap.add_argument("--out", required=True)
    ap.add_argument("--images", type=int, default=64)
    ap.add_argument("--seed", type=int, default=99)
    a = ap.parse_args(argv)
    doc = {"command": "python -m shapes.word_losses " + " ".join(sys.argv[1:] if argv is None else argv),
           "results": [word_losses(m, a.images, a.seed) for m in a.models]}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(doc, indent=2) + "\n")
    for r in doc["results"]:
        print(r["model"])
        for g, v in r["groups"].items():
            print(f"  {g:10} loss {v['loss']:.3f} (image swapped {v['loss_image_swapped']:.3f}), "
                  f"embedding cosine {v['embedding_cosine']:.2f}")


if __name__ == "__main__":
    main()
