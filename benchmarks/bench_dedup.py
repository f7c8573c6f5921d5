#!/usr/bin/env python
"""Deduplicated checkpoints (issue 15): bytes written and training time lost per checkpoint, in one run.

1. **Fine-tuning**: a ``transformers`` Llama built from a random config with a real ``peft`` LoRA adapter (every
   linear layer; the base frozen), trained with Lightning, a checkpoint every ``--every`` steps. Three runs of the same
   job: Lightning ``ModelCheckpoint`` (the anchor), ours with ``dedup=False`` (today's full save), ours deduplicated.
   Per checkpoint: bytes written, and training time lost ((fit time - fit time without checkpoints) / checkpoints).
   The goal: deduplicated bytes per checkpoint at most 1.2x the bytes of what changed (trainable weights + their Adam
   state + the small state), and at least 10x fewer than Lightning. Without ``peft`` the model is the demo MLP with
   its first layers frozen (``--model frozen``).
2. **Full training** (everything changes before every save): deduplicated saves (the default) against
   ``dedup=False``, durable ``CheckpointWriter`` saves of ``--full-mb`` of tensors, alternated, median of
   ``--repeats``; once to disk with fsync, once to the page cache (fsync off: the worst case, where nothing hides the
   CPU work). And the cost of the content hash (XXH3-128, computed while the bytes are written, for the bytes that
   enter the content store) on a save that puts everything into a pack.
3. **Ten branches** from one checkpoint of run 1, each a new ``fit`` with another learning rate into the same folder:
   bytes on disk they added versus ten self-contained copies.
4. **S3**: bytes uploaded per checkpoint by ``push_checkpoint`` (the backup path) to a SeaweedFS server on loopback,
   deduplicated versus full.

No pass/fail: it prints numbers, ratios and goals. Usage (from the repository root)::

    python benchmarks/bench_dedup.py                    # a few minutes on 2 cores
    python benchmarks/bench_dedup.py --json benchmarks/results/dedup-cpu.json
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from typing import Any, Optional

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
try:
    import lightning_ckpt  # noqa: F401
except ImportError:
    sys.path.insert(0, ROOT)
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(ROOT, "tests"))

import lightning.pytorch as pl  # noqa: E402
import torch  # noqa: E402
from lightning.pytorch.callbacks import ModelCheckpoint  # noqa: E402

from bench_foundation import log, machine_facts, quiet  # noqa: E402
from lightning_ckpt import CheckpointWriter, PeriodicCheckpoint, list_checkpoints  # noqa: E402
from lightning_ckpt.tools.standalone import export_standalone  # noqa: E402

GOALS = {"dedup_vs_changed": ("<=", 1.2), "lightning_vs_dedup": (">=", 10.0), "hash_overhead_disk": ("<=", 0.05)}


def mb(n: float) -> str:
    return f"{n / 1e6:.2f} MB"


def du(path: str) -> int:
    total = 0
    for root, _, files in os.walk(path):
        for f in files:
            try:
                total += os.lstat(os.path.join(root, f)).st_size
            except OSError:
                pass
    return total


# --------------------------------------------------------------------------------------------- the fine-tune job
class LoraModule(pl.LightningModule):
    """A Llama (random config, random weights) with a peft LoRA adapter on every linear layer."""

    def __init__(self, hidden: int = 384, layers: int = 6, vocab: int = 4096, rank: int = 8, lr: float = 1e-3):
        super().__init__()
        self.save_hyperparameters()
        from peft import LoraConfig, get_peft_model
        from transformers import LlamaConfig, LlamaForCausalLM

        torch.manual_seed(0)
        cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=hidden * 8 // 3, num_hidden_layers=layers,
                          num_attention_heads=6, num_key_value_heads=6, max_position_embeddings=256,
                          tie_word_embeddings=False)
        base = LlamaForCausalLM(cfg)
        lora = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=["q_proj", "k_proj", "v_proj", "o_proj",
                                                                        "gate_proj", "up_proj", "down_proj"])
        self.model = get_peft_model(base, lora)

    def training_step(self, batch, batch_idx):
        (ids,) = batch
        return self.model(input_ids=ids, labels=ids).loss

    def configure_optimizers(self):
        return torch.optim.AdamW([p for p in self.parameters() if p.requires_grad], lr=self.hparams.lr)


class FrozenModule(pl.LightningModule):
    """Without peft: a wide MLP whose first layers are frozen, a trainable head."""

    def __init__(self, width: int = 1024, layers: int = 12, lr: float = 1e-3):
        super().__init__()
        self.save_hyperparameters()
        torch.manual_seed(0)
        self.emb = torch.nn.Embedding(4096, width)
        self.body = torch.nn.Sequential(*[torch.nn.Linear(width, width) for _ in range(layers)])
        self.emb.requires_grad_(False)
        self.body.requires_grad_(False)
        self.head = torch.nn.Sequential(torch.nn.Linear(width, 64), torch.nn.Linear(64, 4096))

    def training_step(self, batch, batch_idx):
        (ids,) = batch
        h = self.emb(ids)
        for lin in self.body:
            h = torch.relu(lin(h))
        logits = self.head(h)
        return torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids.flatten())

    def configure_optimizers(self):
        return torch.optim.AdamW([p for p in self.parameters() if p.requires_grad], lr=self.hparams.lr)


def make_module(kind: str, lr: float = 1e-3) -> pl.LightningModule:
    return LoraModule(lr=lr) if kind == "lora" else FrozenModule(lr=lr)


def data(steps: int, batch: int = 4, seq: int = 64) -> torch.utils.data.DataLoader:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 4096, (steps * batch, seq), generator=g)
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(ids), batch_size=batch)


def fit(kind: str, root: str, callbacks: list, steps: int, *, ckpt_path: Optional[str] = None, lr: float = 1e-3) -> float:
    module = make_module(kind, lr)
    t = pl.Trainer(accelerator="cpu", devices=1, max_steps=steps, logger=False, enable_progress_bar=False,
                   enable_model_summary=False, enable_checkpointing=bool(callbacks), callbacks=callbacks,
                   default_root_dir=root)
    t0 = time.perf_counter()
    t.fit(module, data(steps), ckpt_path=ckpt_path)
    return time.perf_counter() - t0


def changed_bytes(kind: str) -> tuple[int, int, int]:
    """(all parameter bytes, trainable parameter bytes, AdamW state bytes) of the job's module."""
    m = make_module(kind)
    total = sum(p.numel() * p.element_size() for p in m.parameters()) + sum(
        b.numel() * b.element_size() for b in m.buffers())
    trainable = sum(p.numel() * p.element_size() for p in m.parameters() if p.requires_grad)
    return total, trainable, 2 * trainable + 8 * sum(1 for p in m.parameters() if p.requires_grad)


def bench_fine_tune(args, base: str) -> dict:
    kind, steps, every = args.model, args.steps, args.every
    n_ckpt = steps // every
    total, trainable, adam = changed_bytes(kind)
    log(f"fine-tune: {kind}, {mb(total)} of weights, {trainable / total * 100:.1f}% trainable; {steps} steps, a "
        f"checkpoint every {every} ({n_ckpt} checkpoints)")
    base_s = min(fit(kind, os.path.join(base, f"none{i}"), [], steps) for i in range(2))
    out: dict[str, Any] = {"model": kind, "weights_bytes": total, "trainable_bytes": trainable, "adam_bytes": adam,
                           "trainable_fraction": trainable / total, "steps": steps, "every": every,
                           "fit_without_checkpoints_s": base_s}
    # Lightning's ModelCheckpoint
    d = os.path.join(base, "lightning")
    s = fit(kind, d, [ModelCheckpoint(dirpath=d, every_n_train_steps=every, save_top_k=-1)], steps)
    sizes = [os.path.getsize(os.path.join(d, f)) for f in os.listdir(d) if f.endswith(".ckpt")]
    out["lightning"] = {"bytes_per_checkpoint": statistics.mean(sizes), "lost_s_per_checkpoint": (s - base_s) / n_ckpt}
    for name, dedup in (("ours_full", False), ("ours_dedup", True)):
        d = os.path.join(base, name)
        s = fit(kind, d, [PeriodicCheckpoint(d, every_n_train_steps=every, dedup=dedup)], steps)
        ck = list_checkpoints(d)
        written = [c.manifest["timings"]["bytes"] for c in ck]
        own = [c.size_bytes for c in ck]
        state = [sum(f["size"] for n, f in c.manifest["files"].items() if n.startswith("state-")) for c in ck]
        out[name] = {"bytes_per_checkpoint": statistics.mean(written[1:] or written), "first_bytes": written[0],
                     "own_bytes": own, "written_bytes": written, "state_bytes": statistics.mean(state),
                     "lost_s_per_checkpoint": (s - base_s) / n_ckpt, "on_disk": du(d), "dir": d}
    dd = out["ours_dedup"]
    changed = trainable + adam + dd["state_bytes"]
    out["changed_bytes"] = changed
    out["dedup_vs_changed"] = dd["bytes_per_checkpoint"] / changed
    out["lightning_vs_dedup"] = out["lightning"]["bytes_per_checkpoint"] / dd["bytes_per_checkpoint"]
    out["full_vs_dedup"] = out["ours_full"]["bytes_per_checkpoint"] / dd["bytes_per_checkpoint"]
    for name in ("lightning", "ours_full", "ours_dedup"):
        r = out[name]
        log(f"  {name:11s} {mb(r['bytes_per_checkpoint']):>11s} per checkpoint, {r['lost_s_per_checkpoint']:6.3f} s "
            f"lost per checkpoint")
    log(f"  what changes per checkpoint: {mb(changed)} (trainable {mb(trainable)} + AdamW {mb(adam)} + state "
        f"{mb(dd['state_bytes'])}); the first deduplicated checkpoint wrote {mb(dd['first_bytes'])}")
    log(f"  deduplicated / changed = {out['dedup_vs_changed']:.2f}x (goal <= 1.2); Lightning / deduplicated = "
        f"{out['lightning_vs_dedup']:.1f}x (goal >= 10); ours full / deduplicated = {out['full_vs_dedup']:.1f}x")
    return out


# --------------------------------------------------------------------------------------------- full training
def _timed_saves(base: str, label: str, state: dict, repeats: int, fsync: bool, variants: dict) -> dict:
    """Median save time of each variant (name -> (writer kwargs, save kwargs, content_hash)), alternated; every tensor
    changes before each save (full training)."""
    times: dict[str, list[float]] = {v: [] for v in variants}
    writers = {v: CheckpointWriter(os.path.join(base, f"{label}-{v}"), async_save=False, fsync=fsync, **wk)
               for v, (wk, _, _) in variants.items()}
    for v, (_, _, hashing) in variants.items():
        writers[v].content_hash = hashing
    names = list(variants)
    for r in range(repeats + 1):  # the first round warms up (allocations, the page cache of the folder)
        for v in (names if r % 2 == 0 else names[::-1]):
            for t in state["state_dict"].values():
                t.add_(1.0)
            t0 = time.perf_counter()
            res = writers[v].save(state, step=r, **variants[v][1]).result()
            if r:
                times[v].append(time.perf_counter() - t0)
            shutil.rmtree(res.path, ignore_errors=True)
    for w in writers.values():
        w.close()
    return {v: statistics.median(ts) for v, ts in times.items()}


def bench_hash(args, base: str) -> dict:
    """Full training: deduplication on (the default) against off, when nothing can be shared; and the cost of the
    content hash where it is computed (the bytes that enter the content store)."""
    n = max(1, int(args.full_mb * 1e6 / (4 * 2**20)))
    g = torch.Generator().manual_seed(1)
    state = {"state_dict": {f"w{i}": torch.randn(2**20, generator=g) for i in range(n)}}
    nbytes = n * 4 * 2**20
    out: dict[str, Any] = {"bytes": nbytes}
    keys = [f"state_dict/w{i}" for i in range(n)]
    for label, fsync in (("disk", True), ("page_cache", False)):
        t = _timed_saves(base, f"full-{label}", state, args.repeats, fsync,
                         {"dedup": ({"dedup": True}, {}, True), "no_dedup": ({"dedup": False}, {}, True)})
        over = t["dedup"] / t["no_dedup"] - 1
        out[label] = {"dedup_s": t["dedup"], "no_dedup_s": t["no_dedup"], "overhead": over}
        log(f"full training, {mb(nbytes)} to the {label.replace('_', ' ')}: {t['dedup']:.3f} s deduplicated (nothing to "
            f"share), {t['no_dedup']:.3f} s with dedup=False ({over * 100:+.1f}%; goal <= +5%)")
        # every tensor named stable and changed before each save: all of it goes into a new pack, hashed or not
        t = _timed_saves(base, f"pack-{label}", state, args.repeats, fsync,
                         {"hash": ({"dedup": True}, {"stable": keys}, True),
                          "no_hash": ({"dedup": True}, {"stable": keys}, False)})
        out[label]["pack_with_hash_s"], out[label]["pack_without_hash_s"] = t["hash"], t["no_hash"]
        log(f"  writing {mb(nbytes)} into the content store: {t['hash']:.3f} s with XXH3-128, {t['no_hash']:.3f} s "
            f"without ({(t['hash'] / t['no_hash'] - 1) * 100:+.1f}%)")
    out["hash_overhead_disk"] = out["disk"]["overhead"]
    return out


# --------------------------------------------------------------------------------------------- branches, S3
def bench_branches(args, base: str, ft: dict) -> dict:
    d = ft["ours_dedup"]["dir"]
    parent = list_checkpoints(d)[-1]
    copy = export_standalone(parent.path, os.path.join(base, "standalone"))
    one_copy = du(copy)
    before = du(d)
    t0 = time.perf_counter()
    for i in range(10):
        fit(args.model, d, [PeriodicCheckpoint(d, every_n_train_steps=args.every, allow_existing=True)],
            parent.step + args.every, ckpt_path=parent.path, lr=1e-3 * (1 + i))
    added = du(d) - before
    out = {"branches": 10, "added_bytes": added, "one_copy_bytes": one_copy, "ten_copies_bytes": 10 * one_copy,
           "ratio": 10 * one_copy / added, "seconds": time.perf_counter() - t0}
    log(f"ten branches from {parent.name}: {mb(added)} added on disk versus {mb(10 * one_copy)} for ten "
        f"self-contained copies ({out['ratio']:.1f}x less)")
    return out


def bench_s3(args, base: str, ft: dict) -> dict:
    from seaweed import s3_server

    from lightning_ckpt.folder.transfer import push_checkpoint

    out: dict[str, Any] = {}
    with s3_server(os.path.join(base, "weed"), "bench"):
        for name in ("ours_full", "ours_dedup"):
            sent = [push_checkpoint(c.path, f"s3://bench/{name}").bytes for c in list_checkpoints(ft[name]["dir"])]
            out[name] = {"first_bytes": sent[0], "bytes_per_checkpoint": statistics.mean(sent[1:] or sent)}
            log(f"S3 {name:10s}: first push {mb(sent[0])}, then {mb(out[name]['bytes_per_checkpoint'])} per checkpoint")
    out["ratio"] = out["ours_full"]["bytes_per_checkpoint"] / out["ours_dedup"]["bytes_per_checkpoint"]
    return out


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    try:
        import peft  # noqa: F401

        default_model = "lora"
    except ImportError:
        default_model = "frozen"
    p.add_argument("--model", choices=["lora", "frozen"], default=default_model)
    p.add_argument("--steps", type=int, default=24)
    p.add_argument("--every", type=int, default=4)
    p.add_argument("--full-mb", type=float, default=400.0)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--dir", default=tempfile.gettempdir())
    p.add_argument("--no-s3", action="store_true")
    p.add_argument("--json")
    args = p.parse_args(argv)
    quiet()
    torch.set_num_threads(max(1, (os.cpu_count() or 2) - 1))
    base = tempfile.mkdtemp(prefix="lc-bench-dedup-", dir=args.dir)
    results: dict[str, Any] = {"machine": machine_facts(args), "goals": GOALS}
    t0 = time.perf_counter()
    try:
        results["fine_tune"] = bench_fine_tune(args, base)
        results["full_training_hash"] = bench_hash(args, base)
        results["branches"] = bench_branches(args, base, results["fine_tune"])
        if not args.no_s3:
            results["s3"] = bench_s3(args, base, results["fine_tune"])
    finally:
        shutil.rmtree(base, ignore_errors=True)
    results["total_s"] = time.perf_counter() - t0
    ft = results["fine_tune"]
    log("")
    log("goals:")
    for key, (op, goal) in GOALS.items():
        v = ft.get(key, results["full_training_hash"].get(key))
        ok = v <= goal if op == "<=" else v >= goal
        log(f"  {key:22s} {v:8.3f}  goal {op} {goal}  {'met' if ok else 'NOT met'}")
    if args.json:
        for r in ("ours_full", "ours_dedup"):
            ft[r].pop("dir", None)
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1, default=str)
        log(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
