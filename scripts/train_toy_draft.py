"""Train the toy's draft (models/toy-draft): a tiny Llama text model (LlamaForCausalLM) with the
toy's tokenizer, for speculative decoding (lvb.runtime.speculative).

It learns the toy's answers to lvb.tasks.QUESTION from the token ids the runtime gives a draft:
the toy's chat (picture and question) rendered and tokenized by lvb.text exactly as a Session
does, the image token read as padding (a draft sees no picture), then the answer the toy gives
and <|eot_id|>. It cannot see the picture, so it can only learn the answers' form ("a", a
colour, a shape, the end of the turn) and guess the colour and shape: the acceptance rate this
leaves is what bench/speculative.py measures end to end.

    .venv/bin/python scripts/train_toy_draft.py     # writes models/toy-draft/ (about a minute)
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

from lvb.tasks import QUESTION, sample  # noqa: E402
from lvb.testing.checkpoints import LlamaGeometry, build_llama, write_llama_checkpoint  # noqa: E402
from lvb.text import ChatTemplate, Tokenizer  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
TOY = ROOT / "models" / "toy"
DRAFT = LlamaGeometry("toy-draft", layers=1, hidden=64, intermediate=128, heads=4, kv_heads=2, tied=True,
                      description="1 layer, 4 heads / 2 KV heads, tied embeddings; the toy's tokenizer")
TRAIN_SEED = 1000  # the toy's training pictures (scripts/train_toy.py): their answers are the task's


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=ROOT / "models" / "toy-draft")
    p.add_argument("--answers", type=int, default=2000, help="answers of the task to learn from")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args()


def examples(n: int) -> tuple[torch.Tensor, int]:
    """(ids [n, length] as the draft sees them: prompt, answer, <|eot_id|>; the prompt's length)."""
    tokenizer, template = Tokenizer.from_dir(TOY), ChatTemplate.from_dir(TOY)
    user = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]}]
    prompt = tokenizer.encode_chat(template, user)
    prompt = [tokenizer.pad_id if t == tokenizer.image_id else t for t in prompt]
    eot = tokenizer.id_of("<|eot_id|>")
    rows = [prompt + tokenizer.encode_prompt(answer, add_special_tokens=False)[1:] + [eot] for _, answer in sample(n, TRAIN_SEED)]
    length = max(map(len, rows))
    assert all(len(r) == length for r in rows), "every answer of the task is three tokens"
    return torch.tensor(rows), len(prompt)


def main():
    args = parse_args()
    torch.manual_seed(args.seed)
    torch.set_num_threads(2)
    started = time.time()
    ids, prompt = examples(args.answers)
    model = build_llama(DRAFT, args.seed).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    generator = torch.Generator().manual_seed(args.seed)
    for step in range(args.steps):
        batch = ids[torch.randint(0, len(ids), (args.batch,), generator=generator)]
        logits = model(input_ids=batch).logits
        # Loss on the answer and its end only: the prompt is always the same.
        loss = torch.nn.functional.cross_entropy(logits[:, prompt - 1 : -1].reshape(-1, logits.shape[-1]),
                                                 batch[:, prompt:].reshape(-1))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % 50 == 0 or step == args.steps - 1:
            print(f"step {step}: loss {loss.item():.3f}", flush=True)
    model.eval()
    write_llama_checkpoint(args.out, DRAFT, model=model)
    size = sum(f.stat().st_size for f in args.out.iterdir())
    (args.out / "README.md").write_text(
        f"# toy-draft\n\nThe toy's draft for speculative decoding: {DRAFT.description}, "
        f"{sum(p.numel() for p in model.parameters()):,} parameters, {size / 1e6:.1f} MB.\n\n"
        f"Trained by `scripts/train_toy_draft.py` (seed {args.seed}, {args.steps} steps of {args.batch}, AdamW {args.lr}) "
        f"on {args.answers} answers of the toy's task, in {time.time() - started:.0f} s on the CPU; final loss "
        f"{loss.item():.3f} (a draft that knows the answers' form but not the picture: ln 4 + ln 3 = 2.48 over its "
        "4 answer tokens, 0.62 a token).\n\n"
        "bench/speculative.py measures how many of its proposals the toy keeps.\n")
    print(f"wrote {args.out} ({size / 1e6:.1f} MB) in {time.time() - started:.0f} s")


if __name__ == "__main__":
    main()
