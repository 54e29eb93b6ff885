"""Train the fixture model pair (target + draft) on the Python standard library's own source.

Every machine that runs Python has this text, so the fixture needs no download. The script is
reproducible with a fixed seed (on the same Python version's stdlib). Run::

    python -m hf_turbo.testing.train_fixture --out hf_turbo/testing/fixtures --steps 1500

It trains a byte-level BPE tokenizer with ``tokenizers``, then a Llama-style target and a smaller
draft in the same loop on the same batches. The draft learns from the data and from the target's
distribution (a distillation term), which raises its greedy agreement with the target: that rate
drives speculative decoding. Both are saved with ``save_pretrained`` (safetensors, fp16) next to the
tokenizer files, and a ``metrics.json`` records held-out loss and agreement.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import random
import sysconfig
import time
import zlib
from pathlib import Path

import torch
import torch.nn.functional as F

logger = logging.getLogger(__name__)

VOCAB_SIZE = 512
SPECIAL_TOKENS = ["<|endoftext|>", "<|pad|>"]


def stdlib_files() -> list[Path]:
    """All ``.py`` files of this interpreter's standard library (no site-packages), sorted."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = [p for p in root.rglob("*.py") if "site-packages" not in p.parts]
    return sorted(files)


def split_files(files: list[Path]) -> tuple[list[Path], list[Path]]:
    """Deterministic train/held-out split by a hash of the relative path (1 in 20 held out)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    train, held = [], []
    for p in files:
        key = zlib.crc32(str(p.relative_to(root)).encode())
        (held if key % 20 == 0 else train).append(p)
    return train, held


def read_text(p: Path) -> str:
    try:
        return p.read_text(encoding="utf-8")
    except (UnicodeDecodeError, OSError):
        return ""


def train_tokenizer(files: list[Path]):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator((read_text(p) for p in files), trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|endoftext|>",
        bos_token="<|endoftext|>",
        pad_token="<|pad|>",
        model_max_length=2048,
    )


def encode_corpus(tokenizer, files: list[Path]) -> torch.Tensor:
    eos = tokenizer.eos_token_id
    ids: list[int] = []
    texts = [read_text(p) for p in files]
    for chunk_start in range(0, len(texts), 64):
        batch = [t for t in texts[chunk_start : chunk_start + 64] if t]
        for row in tokenizer(batch, add_special_tokens=False)["input_ids"]:
            ids.extend(row)
            ids.append(eos)
    return torch.tensor(ids, dtype=torch.long)


def model_configs(tokenizer):
    from transformers import LlamaConfig

    common = dict(
        vocab_size=len(tokenizer),
        max_position_embeddings=2048,
        rope_theta=10000.0,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        attention_bias=False,
        mlp_bias=False,
    )
    target = LlamaConfig(
        hidden_size=256, intermediate_size=704, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, head_dim=64, **common,
    )
    draft = LlamaConfig(
        hidden_size=128, intermediate_size=384, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, head_dim=64, **common,
    )
    return target, draft


@torch.no_grad()
def evaluate_pair(target, draft, data: torch.Tensor, seq_len: int, max_windows: int = 64):
    """Held-out loss (nats/token) of each model and greedy next-token agreement of draft vs target."""
    target.eval()
    draft.eval()
    n = min(max_windows, (len(data) - 1) // seq_len)
    t_loss = d_loss = agree = count = 0.0
    for i in range(n):
        x = data[i * seq_len : (i + 1) * seq_len + 1]
        inp, lab = x[:-1][None], x[1:][None]
        tl = target(inp).logits.float()
        dl = draft(inp).logits.float()
        t_loss += F.cross_entropy(tl[0], lab[0], reduction="sum").item()
        d_loss += F.cross_entropy(dl[0], lab[0], reduction="sum").item()
        agree += (tl.argmax(-1) == dl.argmax(-1)).sum().item()
        count += lab.numel()
    target.train()
    draft.train()
    return t_loss / count, d_loss / count, agree / count


def main(argv: list[str] | None = None) -> None:
    from transformers import LlamaForCausalLM

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "fixtures")
    ap.add_argument("--steps", type=int, default=1500, help="optimizer steps (the schedule's length)")
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (1 is reproducible and fastest on a shared 2-core box)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.manual_seed(args.seed)
    random.seed(args.seed)
    torch.set_num_threads(args.threads)

    train_files, held_files = split_files(stdlib_files())
    logger.info("stdlib: %d train files, %d held-out files", len(train_files), len(held_files))
    tokenizer = train_tokenizer(train_files)
    train_ids = encode_corpus(tokenizer, train_files)
    held_ids = encode_corpus(tokenizer, held_files)
    logger.info("tokens: train %d, held-out %d", len(train_ids), len(held_ids))

    tcfg, dcfg = model_configs(tokenizer)
    target = LlamaForCausalLM(tcfg)
    draft = LlamaForCausalLM(dcfg)
    logger.info("params: target %.2fM, draft %.2fM",
                sum(p.numel() for p in target.parameters()) / 1e6,
                sum(p.numel() for p in draft.parameters()) / 1e6)
    params = list(target.parameters()) + list(draft.parameters())
    opt = torch.optim.AdamW(params, lr=args.lr, betas=(0.9, 0.95), weight_decay=0.05)
    gen = torch.Generator().manual_seed(args.seed)
    warmup = 100
    start = time.time()
    step = 0
    seen = 0
    while step < args.steps:
        elapsed = time.time() - start
        # Linear warm-up, then cosine decay to 10% over the fixed step count (reproducible).
        frac = step / args.steps
        lr = args.lr * min(1.0, (step + 1) / warmup) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))
        for g in opt.param_groups:
            g["lr"] = lr
        starts = torch.randint(0, len(train_ids) - args.seq_len - 1, (args.batch_size,), generator=gen)
        batch = torch.stack([train_ids[s : s + args.seq_len + 1] for s in starts.tolist()])
        inp, lab = batch[:, :-1], batch[:, 1:]
        t_logits = target(inp).logits
        t_loss = F.cross_entropy(t_logits.reshape(-1, t_logits.size(-1)), lab.reshape(-1))
        d_logits = draft(inp).logits
        d_ce = F.cross_entropy(d_logits.reshape(-1, d_logits.size(-1)), lab.reshape(-1))
        d_kl = F.kl_div(F.log_softmax(d_logits, -1), F.log_softmax(t_logits.detach(), -1),
                        log_target=True, reduction="batchmean") / args.seq_len
        loss = t_loss + 0.5 * d_ce + 0.5 * d_kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        step += 1
        seen += inp.numel()
        if step % 50 == 0 or step == 10:
            logger.info("step %d  %.0fs  tok/s %.0f  lr %.2e  target %.3f  draft ce %.3f kl %.3f",
                        step, elapsed, seen / max(elapsed, 1e-6), lr, t_loss.item(), d_ce.item(),
                        d_kl.item())

    t_held, d_held, agree = evaluate_pair(target, draft, held_ids, args.seq_len)
    logger.info("held-out: target %.3f nats/token, draft %.3f, greedy agreement %.1f%%",
                t_held, d_held, 100 * agree)
    args.out.mkdir(parents=True, exist_ok=True)
    for name, model in (("target", target), ("draft", draft)):
        d = args.out / name
        model.generation_config.pad_token_id = tokenizer.pad_token_id
        model.half().save_pretrained(d, safe_serialization=True)
        tokenizer.save_pretrained(d)
    metrics = {
        "steps": step,
        "train_tokens_seen": seen,
        "train_seconds": round(time.time() - start, 1),
        "held_out_loss_target": round(t_held, 4),
        "held_out_loss_draft": round(d_held, 4),
        "greedy_agreement_draft_vs_target": round(agree, 4),
        "seed": args.seed,
        "threads": args.threads,
        "vocab_size": len(tokenizer),
        "seq_len": args.seq_len,
        "batch_size": args.batch_size,
    }
    (args.out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    logger.info("saved to %s", args.out)


if __name__ == "__main__":
    main()
