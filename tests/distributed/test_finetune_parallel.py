"""Parallel fine-tuning (`ltk finetune --parallel ddp|zero3|fsdp2 --nproc 2`, 2 CPU processes on
gloo): LoRA and QLoRA on 2 ranks give the losses and adapter weights of one process (fp32, 1e-5);
under zero3 / fsdp2 each rank holds about half of the frozen base's bytes (QLoRA: of the NF4
storage), the gradient reduction moves the adapters' bytes only, and N steps + resume + N steps
equals 2N. One single-process reference run per method is reused by every comparison, and every
2-rank run of the file goes through one spawn (the processes start once)."""
import json
import os
import subprocess
import sys

import pytest
import torch

STEPS = 20
RUNS = [("lora", "ddp"), ("lora", "zero3"), ("lora", "fsdp2"), ("qlora", "zero3"), ("qlora", "fsdp2")]


@pytest.fixture(scope="module")
def data(uneven_rows):
    return uneven_rows


def _cfg(base, data, out, method, parallel="auto", steps=STEPS, grad_accum=1, **kw):
    from ltk.training.finetune import FinetuneConfig

    # packed rows (segment ids sliced per rank); the first half of the steps warms up, so a run of
    # fewer steps takes the learning rates of the longer run's first ones
    return FinetuneConfig(method=method, base=str(base), data=data, out_dir=str(out), steps=steps, batch_size=4,
                          grad_accum=grad_accum, packing=True, max_len=96, eval_every=0, warmup_steps=STEPS // 2,
                          device="cpu", parallel=parallel, **kw)


def _losses(run):
    return [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]


def _adapter(run):
    from safetensors.torch import load_file

    return load_file(str(run / "adapter" / "adapter_model.safetensors"))


def _frozen_bytes_single(model) -> int:
    """Bytes of the frozen tensors of a one-process model: frozen parameters and NF4 storage."""
    from ltk.kernels.nf4 import NF4Linear

    n = sum(p.numel() * p.element_size() for p in model.parameters() if not p.requires_grad)
    return n + sum(b.numel() * b.element_size() for m in model.modules() if isinstance(m, NF4Linear)
                   for b in m.buffers(recurse=False))


@pytest.fixture(scope="module")
def reference(tiny_base, data, tmp_path_factory):
    """One process, each method: its run folder, and the frozen bytes of its adapted model."""
    from ltk.training.adapters import apply_adapter
    from ltk.training.base_model import load_base
    from ltk.training.finetune import run_config, run_finetune

    out = {}
    for method in ("lora", "qlora"):
        run = tmp_path_factory.mktemp(f"single-{method}")
        cfg = _cfg(tiny_base, data, run, method)
        run_finetune(cfg)
        model = apply_adapter(load_base(tiny_base, torch.device("cpu"))[0], "gpt", run_config(cfg).adapter)
        out[method] = (run, _frozen_bytes_single(model))
    return out


PROBES = ["lora-ddp", "lora-zero3", "lora-fsdp2", "qlora-zero3", "qlora-fsdp2"]


def _probe(base, data, out, method, parallel):
    """One step of a fresh run through the Trainer: the frozen bytes this rank holds, the bytes the
    step's collectives moved (our engines' counters, ltk/parallel/dist.py), and what got a
    gradient and optimizer state."""
    from ltk.kernels.nf4 import NF4Linear
    from ltk.parallel.dist import STATS
    from ltk.parallel.fsdp2 import local
    from ltk.training.finetune import run_config
    from ltk.training.trainer import Trainer

    trainer = Trainer(run_config(_cfg(base, data, out, method, parallel, steps=1, grad_accum=2)), overwrite=True)
    par, model = trainer.par, trainer.model
    held = None
    if parallel == "zero3":
        held = par.engine.frozen_bytes()["shard"]
    elif parallel == "fsdp2":  # the local shards of the frozen parameters (+ QLoRA's replicated fp32 statistics)
        held = sum(local(p).numel() * p.element_size() for p in model.parameters() if not p.requires_grad)
        held += sum(b.numel() * b.element_size() for m in model.modules() if isinstance(m, NF4Linear)
                    for b in m.buffers(recurse=False))
    STATS.reset()
    trainer.train_step()
    return {"held": held, "load": trainer.base_load,
            "adapters": sum(p.numel() for p in model.parameters() if p.requires_grad),
            "frozen_grads": [n for n, p in model.named_parameters() if not p.requires_grad and p.grad is not None],
            "moments": sum(local(v).numel() for st in par.optimizer.state.values() for v in st.values()
                           if torch.is_tensor(v) and v.dim() > 0),
            "reduced": dict(STATS.payload),
            "padded": sum(par.engine.padded_numels()) if parallel == "zero3" else None}


def _rank(rank, world, base, data, root):
    """Every 2-rank run of the file, in one pair of processes (module docstring)."""
    from pathlib import Path

    from ltk.training.finetune import run_finetune

    os.environ["LTK_PROGRESS"] = "0"
    root, out = Path(root), {}
    for method, parallel in RUNS:
        run_finetune(_cfg(base, data, root / f"{method}-{parallel}", method, parallel), overwrite=True)
    for name in PROBES:
        out[name] = _probe(base, data, root / f"probe-{name}", *name.split("-"))
    for parallel in ("ddp", "zero3", "fsdp2"):  # N + resume + N
        split = root / f"resume-{parallel}"
        run_finetune(_cfg(base, data, split, "lora", parallel, steps=STEPS // 2), overwrite=True)
        run_finetune(_cfg(base, data, split, "lora", parallel), resume=str(split))
    return out


@pytest.fixture(scope="module")
def parallel_runs(tiny_base, data, tmp_path_factory):
    from ltk.parallel.dist import spawn

    root = tmp_path_factory.mktemp("parallel")
    stats = spawn(_rank, 2, str(tiny_base), data, str(root), timeout_s=240)
    return root, stats


@pytest.mark.parametrize("method,parallel", RUNS)
def test_two_ranks_give_the_losses_and_adapters_of_one(reference, parallel_runs, method, parallel):
    root, _ = parallel_runs
    run, single = root / f"{method}-{parallel}", reference[method][0]
    a, b = _losses(single), _losses(run)
    assert len(a) == len(b) == STEPS
    assert b == pytest.approx(a, abs=1e-5)
    wa, wb = _adapter(single), _adapter(run)
    assert wa.keys() == wb.keys() and wa
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], rtol=0, atol=1e-5, msg=k)
    sa, sb = (json.loads((r / "summary.json").read_text()) for r in (single, run))
    assert sb["trainable_params"] == sa["trainable_params"]
    assert sb["after"]["val_loss"] == pytest.approx(sa["after"]["val_loss"], abs=1e-5)


@pytest.mark.parametrize("name", PROBES)
def test_frozen_base_sharded_and_only_adapter_gradients_reduced(reference, parallel_runs, name):
    _, stats = parallel_runs
    method, parallel = name.split("-")
    total = reference[method][1]  # bytes of the one-process model's frozen tensors
    accum = 2
    for s in (r[name] for r in stats):
        assert s["frozen_grads"] == []  # frozen: no gradient ...
        assert s["moments"] <= 2 * s["adapters"]  # ... and no optimizer state: AdamW's moments of the adapters
        if parallel == "ddp":  # one all-reduce of the adapters' fp32 gradients per step (no_sync before)
            assert s["reduced"]["all_reduce"] == 4 * s["adapters"]
        if parallel == "zero3":  # a reduce-scatter of the adapters' (padded) gradients per micro-batch
            assert s["adapters"] <= s["padded"] < s["adapters"] + 8
            assert s["reduced"]["reduce_scatter"] == accum * 4 * s["padded"]
            assert s["reduced"].get("all_reduce", 0) <= 4  # the gradient norm's scalar
        if parallel != "ddp":  # each rank about half of the frozen bytes (padding and alignment aside)
            assert total / 2 <= s["held"] <= 0.55 * total, (s["held"], total)
    if parallel != "ddp":
        assert sum(s[name]["held"] for s in stats) >= total


@pytest.mark.parametrize("name", [p for p in PROBES if not p.endswith("ddp")])
def test_set_up_reads_the_base_a_tensor_at_a_time(tiny_base, reference, parallel_runs, name):
    """zero3 / fsdp2: the base is built on meta and each rank reads its tensors one at a time
    (ltk/training/instruct_setup.py), so set-up holds its shard + one tensor (+ QLoRA: one layer's
    NF4 storage and every layer's fp32 statistics, 8 bytes a layer here), never the whole base as a
    one-process set-up does (tiny base: 152,576 bytes, its largest tensor the 38,400-byte embedding)."""
    from ltk.kernels.nf4 import NF4Linear
    from ltk.training.checkpoint import full_model_state

    _, stats = parallel_runs
    method, parallel = name.split("-")
    sizes = [t.numel() * t.element_size() for t in full_model_state(tiny_base).values()]
    whole, largest = sum(sizes), max(sizes)
    codes = 0  # QLoRA: the NF4 storage of its largest layer, kept while its buffers are cut
    if method == "qlora":
        from ltk.training.adapters import apply_adapter
        from ltk.training.base_model import load_base
        from ltk.training.finetune import run_config

        model = apply_adapter(load_base(tiny_base, torch.device("cpu"))[0], "gpt",
                              run_config(_cfg(tiny_base, "builtin", "x", method)).adapter)
        layers = [m for m in model.modules() if isinstance(m, NF4Linear)]
        codes = max(sum(t.numel() * t.element_size() for t in list(m.buffers()) + list(m.parameters()))
                    for m in layers)
        # + every layer's fp32 statistics, kept until loading ends (fsdp2 asks for them after the codes)
        codes += sum(b.numel() * b.element_size() for m in layers for b in m.buffers() if b.is_floating_point())
    for s in (r[name] for r in stats):
        load = s["load"]
        assert load["whole_bytes"] == reference[method][1] and load["shard_bytes"] == s["held"]
        assert largest <= load["peak_bytes"] <= largest + codes, (load, largest, codes)
        assert load["shard_bytes"] + load["peak_bytes"] <= 0.76 * whole, (load, whole)
        if parallel == "zero3":  # only the tensors that meet this rank's bytes are read
            assert load["read_bytes"] < whole
    assert sum(r[name]["load"]["read_bytes"] for r in stats) >= whole  # between them, every tensor


def test_lora_resumed_on_two_ranks_equals_the_uninterrupted_run(parallel_runs):
    root, _ = parallel_runs
    from ltk.training.checkpoint import load_checkpoint

    for parallel in ("ddp", "zero3", "fsdp2"):
        whole, split = root / f"lora-{parallel}", root / f"resume-{parallel}"
        assert _losses(split) == _losses(whole), parallel
        a, b = load_checkpoint(whole).model, load_checkpoint(split).model
        assert a.keys() == b.keys() and all(".lora_" in k for k in a)
        for k in a:
            assert torch.equal(a[k], b[k]), (parallel, k)


def test_the_command_line_launches_two_ranks(tiny_base, data, reference, tmp_path):
    """`ltk finetune --parallel zero3 --nproc 2`: torchrun underneath, the same run as one process."""
    out = tmp_path / "cli"
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1", "LTK_PROGRESS": "0"}
    cmd = [sys.executable, "-m", "ltk.cli", "finetune", "--method", "lora", "--base", str(tiny_base), "--data", data,
           "--out", str(out), "--steps", "2", "--warmup-steps", str(STEPS // 2), "--batch-size", "4",
           "--packing",
           "--max-len", "96", "--eval-every", "0", "--device", "cpu", "--parallel", "zero3", "--nproc", "2"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "lora:" in proc.stdout and proc.stdout.count("lora:") == 1  # rank 0 reports
    assert _losses(out) == pytest.approx(_losses(reference["lora"][0])[:2], abs=1e-5)
    assert (out / "adapter" / "adapter_config.json").is_file()


def test_adapters_with_tensor_or_pipeline_parallelism_are_refused(tiny_base, data, tmp_path):
    from ltk.training.config import ConfigError
    from ltk.training.config_check import check_run
    from ltk.training.finetune import run_config

    cfg = run_config(_cfg(tiny_base, data, tmp_path, "lora", "ddp"))
    from ltk.training.base_model import adopt_base

    adopt_base(cfg)
    cfg.parallel.tp = 2
    with pytest.raises(ConfigError, match="tensor or pipeline parallelism"):
        check_run(cfg, world=2, size=False, warn=False)
    cfg.parallel.tp, cfg.parallel.strategy = 1, "zero2"
    with pytest.raises(ConfigError, match="not --parallel.strategy zero2"):
        check_run(cfg, world=2, size=False, warn=False)
