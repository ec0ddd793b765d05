"""The embedded base: a small Llama built and pretrained from a seed, saved in plain HF format.

`python -m loraplex.training.base` prints the base's path, building it first if it is missing.
`python -m loraplex.training.base --rebuild` makes it again from scratch (about 10 minutes on 2 cores).
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from pathlib import Path

import torch

from loraplex.training import synthetic
from loraplex.training.pretokenizers import LLAMA3_SPLIT

EMBEDDED_BASE_DIR = Path(__file__).resolve().parent / "base_model"
SEED = 1234

BOS, EOS, PAD = "<|begin_of_text|>", "<|end_of_text|>", "<|pad|>"
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
# Every dimension is a multiple of 256: bitsandbytes' CPU kernels need multiples of 128 and
# llama.cpp's k-quants need rows that are multiples of 256.
MODEL_DIMS = dict(
    vocab_size=2048,
    hidden_size=256,
    intermediate_size=768,
    num_hidden_layers=6,
    num_attention_heads=4,
    num_key_value_heads=4,
    max_position_embeddings=256,
)


def embedded_base_path() -> Path:
    return EMBEDDED_BASE_DIR


def ensure_base(rebuild: bool = False) -> Path:
    """The embedded base's folder, built first when it is missing."""
    if rebuild or not (EMBEDDED_BASE_DIR / "model.safetensors").exists():
        build_base(EMBEDDED_BASE_DIR)
    return EMBEDDED_BASE_DIR


def build_tokenizer(vocab_size: int, seed: int):
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(LLAMA3_SPLIT), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[BOS, EOS, PAD],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(synthetic.iter_tokenizer_corpus(seed), trainer=trainer)
    bos_id = tok.token_to_id(BOS)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A",
        pair=f"{BOS} $A {BOS} $B",
        special_tokens=[(BOS, bos_id)],
    )
    hf_tok = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        clean_up_tokenization_spaces=False,
        model_max_length=MODEL_DIMS["max_position_embeddings"],
    )
    hf_tok.chat_template = CHAT_TEMPLATE
    return hf_tok


def build_model(tokenizer, seed: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        **MODEL_DIMS,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return LlamaForCausalLM(config)


def _batches(tokenizer, rows: list[tuple[str, str]], batch_size: int, rng: random.Random):
    """Endless shuffled batches; loss on completions only, so capacity goes to the skills and
    not to predicting the random words inside prompts."""
    from loraplex.training.data import CompletionCollator, encode_example

    collate = CompletionCollator(tokenizer.pad_token_id)
    order = list(range(len(rows)))
    while True:
        rng.shuffle(order)
        for i in range(0, len(order) - batch_size + 1, batch_size):
            batch = [
                encode_example(tokenizer, {"prompt": rows[j][0], "completion": rows[j][1]}, 256)
                for j in order[i : i + batch_size]
            ]
            yield collate(batch)


def pretrain(model, tokenizer, steps: int, seed: int, batch_size: int = 64, lr: float = 1e-3) -> list[float]:
    """Plain causal-LM pretraining on the synthetic mix; returns the loss curve."""
    from tqdm import tqdm

    if steps <= 0:
        return []
    rows = synthetic.pretrain_mix(60000, seed)
    batches = _batches(tokenizer, rows, batch_size, random.Random(seed))
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01, betas=(0.9, 0.95))
    warmup = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt,
        lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)),
    )
    model.train()
    losses = []
    bar = tqdm(range(steps), desc="pretrain base", file=sys.stderr)
    for _ in bar:
        loss = model(**next(batches)).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        bar.set_postfix(loss=f"{loss.item():.3f}")
    return losses


def build_base(out_dir: Path, steps: int = 2000, seed: int = SEED) -> Path:
    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
    started = time.time()
    tokenizer = build_tokenizer(MODEL_DIMS["vocab_size"], seed)
    model = build_model(tokenizer, seed)
    losses = pretrain(model, tokenizer, steps, seed)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.to(torch.bfloat16).save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    card = {
        "seed": seed,
        "steps": steps,
        "final_loss": sum(losses[-50:]) / len(losses[-50:]) if losses else None,
        "parameters": sum(p.numel() for p in model.parameters()),
        "build_seconds": round(time.time() - started, 1),
        "torch": torch.__version__,
    }
    (out_dir / "loraplex_base.json").write_text(json.dumps(card, indent=2) + "\n")
    return out_dir


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loraplex.training.base", description=__doc__)
    parser.add_argument("--rebuild", action="store_true", help="make the base again from its seed")
    parser.add_argument("--out", type=Path, default=None, help="build into this folder instead")
    parser.add_argument("--steps", type=int, default=2000)
    args = parser.parse_args(argv)
    if args.out is not None:
        print(build_base(args.out, steps=args.steps))
    else:
        print(ensure_base(rebuild=args.rebuild))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
