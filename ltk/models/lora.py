"""LoRA: low-rank adaptation of frozen linear layers (Hu et al. 2021, "LoRA: Low-Rank
Adaptation of Large Language Models", §4.1), with adapters stored in Hugging Face PEFT's
folder format so that PEFT can load ours and we can load PEFT's.

    apply_lora(model, ["wq", "wv"], r=8, alpha=16)   every matching nn.Linear -> LoRALinear
    ... train: only lora_A / lora_B require grad ...
    save_adapter(model, "out/adapter")             adapter_config.json + adapter_model.safetensors
    load_adapter(base_model, "out/adapter")        a PEFT folder applied onto one of our models
    remove_lora(model)                              plain nn.Linear with W + s·BA, for deployment

Supported for the PEFT format: Llama (wq wk wv wo w1 w3 w2 <-> q_proj k_proj v_proj o_proj
gate_proj up_proj down_proj) and GPT-2 (c_attn c_proj c_fc, the same names; transformers keeps
them as Conv1D, which PEFT adapts with fan_in_fan_out=True: lora_A (r, in) and lora_B (out, r)
have the same shapes as ours, only PEFT's merge transposes).

QLoRA (Dettmers et al. 2023, §3): the frozen base may also be a 4-bit `kernels.nf4.NF4Linear`
(ltk/models/qlora.py quantizes a model and then calls apply_lora). The base computes its own term
y = x · dequant(W_NF4)ᵀ + b in its compute dtype; A and B are kept in that compute dtype. An
NF4 base cannot be merged in place (W + s·BA re-quantized to 4 bits would lose the update
under the quantization error), so merge()/unmerge() refuse; remove_lora(model) instead
dequantizes each NF4 base into a full-precision nn.Linear and adds s·BA there.
"""
from __future__ import annotations

import json
import math
import re
from fnmatch import fnmatch
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import save_file

from ltk.kernels.backend import resolve_backend
from ltk.kernels.lora import lora_linear
from ltk.kernels.nf4 import NF4Linear
from ltk.models.files import load_safetensors, read_json

_PREFIX = "base_model.model."  # PEFT's key prefix: PeftModel.base_model (LoraModel).model


class LoRALinear(nn.Module):
    """A frozen nn.Linear plus a trainable low-rank update (Hu et al. 2021, §4.1, eq. 3):

        y = x Wᵀ + b + s · dropout(x) Aᵀ Bᵀ,    A (r, in), B (out, r),  s = alpha / r
                                                (rsLoRA, Kalajdzievski 2023: s = alpha / sqrt(r))

    * B starts at zero (A Kaiming-uniform, as PEFT: kaiming_uniform_(a=sqrt(5))), so at step 0
      the update is exactly 0 and the model is the base model. A is random so the gradient
      ∂L/∂B = s · dyᵀ (x Aᵀ) is not zero and training moves off the start (∂L/∂A = s · Bᵀ dyᵀ x
      is zero until B has moved: the first step changes B only).
    * ΔW = s · B A is a product through an r-dimensional space: rank(ΔW) ≤ r.
    * Trainable parameters r · (in + out) instead of in · out (d = 4096, r = 8: 65,536 vs
      16.8M, 0.4%); the optimizer state shrinks by the same factor.
    * merge(): W ← W + s·BA in place, after which the forward is a plain linear, so inference
      costs nothing extra (§4.1, "No additional inference latency"); unmerge() subtracts it.
      Train unmerged: while merged the LoRA term is skipped and A, B get no gradient.

    The base weight and bias of an nn.Linear are the Linear's own Parameter objects (frozen),
    kept under the same names (`weight`, `bias`), so the base model's state-dict keys do not
    change. An NF4Linear base (QLoRA) is kept whole as the submodule `base` (keys
    `<name>.base.packed`, ...; `weight` is None), runs its own forward, and A, B live in its
    compute dtype.
    """

    def __init__(self, base: nn.Linear | NF4Linear, r: int = 8, alpha: float = 16, dropout: float = 0.0,
                 use_rslora: bool = False, backend: str = "auto"):
        super().__init__()
        self.backend = backend  # kernels.lora: "triton" fuses the low-rank term into the GEMM epilogue
        if not isinstance(base, (nn.Linear, NF4Linear)):
            raise TypeError(f"LoRALinear wraps an nn.Linear or an NF4Linear, got {type(base).__name__}")
        if r <= 0:
            raise ValueError(f"LoRA rank r must be positive, got {r}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"LoRA dropout must be in [0, 1), got {dropout}")
        self.in_features, self.out_features = base.in_features, base.out_features
        self.r, self.alpha, self.use_rslora = r, alpha, use_rslora
        self.scaling = alpha / math.sqrt(r) if use_rslora else alpha / r
        if isinstance(base, NF4Linear):  # QLoRA: the 4-bit base computes its own term
            self.base, self.weight, self.bias = base, None, None
            for p in base.parameters():
                p.requires_grad_(False)
            kw = dict(device=base.packed.device, dtype=base.compute_dtype)
        else:
            self.base = None
            self.weight, self.bias = base.weight, base.bias
            self.weight.requires_grad_(False)
            if self.bias is not None:
                self.bias.requires_grad_(False)
            kw = dict(device=base.weight.device, dtype=base.weight.dtype)
        self.lora_A = nn.Parameter(torch.empty(r, self.in_features, **kw))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, r, **kw))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.merged = False

    def delta_weight(self) -> torch.Tensor:
        """ΔW = s · B A, shape (out, in), rank ≤ r."""
        return self.scaling * (self.lora_B @ self.lora_A)

    @property
    def quantized(self) -> bool:
        """True when the frozen base is an NF4Linear (QLoRA)."""
        return self.base is not None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.quantized:  # base term in the base's compute dtype, LoRA term in A's (the same)
            y = self.base(x)
            u = self.lora_dropout(x.to(self.lora_A.dtype))
            return y + (self.scaling * F.linear(F.linear(u, self.lora_A), self.lora_B)).to(y.dtype)
        if self.merged:
            return F.linear(x, self.weight, self.bias)
        if isinstance(self.lora_dropout, nn.Identity) and resolve_backend(self.backend, x) == "triton":
            # one kernel: x·Wᵀ + b + s·(x·Aᵀ)·Bᵀ, the LoRA term added in the GEMM's epilogue
            return lora_linear(x, self.weight, self.bias, self.lora_A, self.lora_B, self.scaling, backend="triton")
        y = F.linear(x, self.weight, self.bias)
        return y + self.scaling * F.linear(F.linear(self.lora_dropout(x), self.lora_A), self.lora_B)

    def _refuse_nf4(self, what: str) -> None:
        if self.quantized:
            raise ValueError(f"cannot {what} LoRA into a 4-bit NF4 base: W + s·BA would be re-quantized "
                             "to 4 bits and the update lost in the quantization error. Use "
                             "remove_lora(model) (dequantizes each NF4 base into a full-precision nn.Linear "
                             "and adds s·BA) or models.qlora.dequantize_model(model) first.")

    def full_precision_base(self) -> nn.Linear:
        """The frozen base as a plain nn.Linear (an NF4 base dequantized into its compute dtype)."""
        if not self.quantized:
            linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                               device=self.weight.device, dtype=self.weight.dtype)
            linear.weight = nn.Parameter(self.weight.detach(), requires_grad=False)
            if self.bias is not None:
                linear.bias = nn.Parameter(self.bias.detach(), requires_grad=False)
            return linear
        b = self.base
        linear = nn.Linear(b.in_features, b.out_features, bias=b.bias is not None, device=b.packed.device,
                           dtype=b.compute_dtype)
        linear.weight = nn.Parameter(b.dequantized_weight(b.compute_dtype).detach(), requires_grad=False)
        if b.bias is not None:
            linear.bias = nn.Parameter(b.bias.detach().to(b.compute_dtype), requires_grad=False)
        return linear

    @torch.no_grad()
    def merge(self) -> None:
        self._refuse_nf4("merge")
        if not self.merged:
            self.weight += self.delta_weight().to(self.weight.dtype)
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        self._refuse_nf4("unmerge")
        if self.merged:
            self.weight -= self.delta_weight().to(self.weight.dtype)
            self.merged = False

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, r={self.r}, "
                f"alpha={self.alpha}, scaling={self.scaling:g}, merged={self.merged}, quantized={self.quantized}")


def _matches(name: str, pattern: str) -> bool:
    """An exact name or dotted suffix ("wq", "attn.wq"), or an fnmatch glob ("layers.*.attn.wq")."""
    return name == pattern or name.endswith("." + pattern) or fnmatch(name, pattern)


def _collapse(name: str) -> str:
    """layers.3.attn.wq -> layers.*.attn.wq, to list available names briefly."""
    return re.sub(r"(^|\.)\d+(?=\.|$)", r"\1*", name)


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def apply_lora(model: nn.Module, targets, r: int = 8, alpha: float = 16, dropout: float = 0.0,
               use_rslora: bool = False) -> nn.Module:
    """Replace every nn.Linear whose qualified name matches one of `targets` by a LoRALinear,
    in place, and freeze every other parameter (LoRA parameters added earlier stay trainable).
    An NF4Linear (ltk/models/qlora.py: quantize_model) is a target like an nn.Linear (QLoRA).
    Returns the model."""
    targets = [targets] if isinstance(targets, str) else list(targets)
    if not targets:
        raise ValueError("apply_lora needs at least one target name pattern")
    linears = base_linears(model)
    chosen = {n for n in linears if any(_matches(n, p) for p in targets)}
    unmatched = [p for p in targets if not any(_matches(n, p) for n in linears)]
    if unmatched:
        available = sorted({_collapse(n) for n in linears})
        raise ValueError(f"LoRA target patterns matched no nn.Linear or NF4Linear: {unmatched}; "
                         f"available: {', '.join(available)}")
    owners: dict[int, list[str]] = {}  # a tied weight (output head = embedding) would be
    for n, p in model.named_parameters(remove_duplicate=False):  # changed twice by a merge
        owners.setdefault(id(p), []).append(n)
    for name in sorted(chosen):
        if isinstance(linears[name], NF4Linear):  # quantize_model never quantizes a tied weight
            continue
        shared = owners[id(linears[name].weight)]
        if len(shared) > 1:
            raise ValueError(f"cannot apply LoRA to {name}: its weight is tied to {shared}")
    for p in model.parameters():
        p.requires_grad_(False)
    backend = getattr(getattr(model, "config", None), "backend", "auto")  # the model's kernel setting
    for name in sorted(chosen):
        _set_module(model, name, LoRALinear(linears[name], r, alpha, dropout, use_rslora, backend=backend))
    for p in lora_parameters(model):
        p.requires_grad_(True)
    return model


def base_linears(model: nn.Module) -> dict[str, nn.Module]:
    """Every nn.Linear or NF4Linear not already inside a LoRALinear (an NF4 base of one is its
    submodule `base`), by qualified name."""
    inside = {n + "." for n, m in model.named_modules() if isinstance(m, LoRALinear)}
    return {n: m for n, m in model.named_modules() if isinstance(m, (nn.Linear, NF4Linear))
            and not any(n.startswith(p) for p in inside)}


def lora_modules(model: nn.Module) -> dict[str, LoRALinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}


def lora_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The A and B of every LoRALinear: what the optimizer should get."""
    return [p for m in lora_modules(model).values() for p in (m.lora_A, m.lora_B)]


def trainable_parameter_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def merge_lora(model: nn.Module) -> nn.Module:
    for m in lora_modules(model).values():
        m.merge()
    return model


def unmerge_lora(model: nn.Module) -> nn.Module:
    for m in lora_modules(model).values():
        m.unmerge()
    return model


def remove_lora(model: nn.Module, merge: bool = True) -> nn.Module:
    """Replace every LoRALinear by a plain nn.Linear: with W + s·BA (merge=True), or with the
    base W (merge=False, the adapter is discarded). The new Linears' parameters require grad.
    An NF4 base is dequantized into a full-precision nn.Linear (its compute dtype) first, and
    s·BA is added there: the result is a full-precision copy, never a re-quantized one."""
    for name, m in lora_modules(model).items():
        if not m.quantized:
            m.merge() if merge else m.unmerge()
        linear = m.full_precision_base()
        if m.quantized and merge:
            with torch.no_grad():
                linear.weight += m.delta_weight().to(linear.weight.dtype)
        for p in linear.parameters():
            p.requires_grad_(True)
        _set_module(model, name, linear)
    return model


# ---- PEFT folders -------------------------------------------------------------------------

def _hf_names(model: nn.Module) -> tuple[dict[str, str], bool]:
    """Our Linear module names -> transformers' module names, and PEFT's fan_in_fan_out
    (True where transformers keeps the layers as Conv1D, GPT-2)."""
    from ltk.models.gpt import GPT
    from ltk.models.hf import llama as hf_llama
    from ltk.models.llama import Llama

    if isinstance(model, Llama):
        pairs = hf_llama._name_pairs(model.config)
        names = {o.removesuffix(".weight"): t.removesuffix(".weight") for o, t in pairs}
        return names, False
    if isinstance(model, GPT):  # transformer.h.{i}.{attn.c_attn, attn.c_proj, mlp.c_fc, mlp.c_proj}
        ours = set(base_linears(model)) | set(lora_modules(model))
        return {n: "transformer." + n for n in ours if n.startswith("h.")}, True
    raise NotImplementedError(f"PEFT adapters are supported for Llama and GPT (GPT-2), "
                              f"not {type(model).__name__}")


def save_adapter(model: nn.Module, path, base_model_name_or_path: str | None = None) -> Path:
    """Write adapter_config.json + adapter_model.safetensors that PEFT's
    PeftModel.from_pretrained(transformers_model, path) loads. Keys are PEFT's:
    base_model.model.<transformers module>.lora_A.weight / lora_B.weight."""
    mods = lora_modules(model)
    if not mods:
        raise ValueError("the model has no LoRA layers: call apply_lora first")
    names, fan_in_fan_out = _hf_names(model)
    settings = {(m.r, m.alpha, m.use_rslora, m.lora_dropout.p if isinstance(m.lora_dropout, nn.Dropout) else 0.0)
                for m in mods.values()}
    if len(settings) > 1:
        raise ValueError(f"one adapter config needs the same (r, alpha, use_rslora, dropout) on every "
                         f"LoRA layer, found {sorted(settings)}")
    (r, alpha, use_rslora, dropout), = settings
    theirs = {names[n] for n in mods}
    # a short name ("q_proj") when every layer of that kind is adapted, else full module names
    target_modules = set()
    for t in theirs:
        short = t.rsplit(".", 1)[-1]
        all_of_kind = {v for v in names.values() if v.rsplit(".", 1)[-1] == short}
        target_modules |= {short} if all_of_kind <= theirs else {t}
    tensors = {}
    for n, m in mods.items():
        tensors[f"{_PREFIX}{names[n]}.lora_A.weight"] = m.lora_A.detach().cpu().contiguous()
        tensors[f"{_PREFIX}{names[n]}.lora_B.weight"] = m.lora_B.detach().cpu().contiguous()
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model_name_or_path,
        "r": r, "lora_alpha": alpha, "lora_dropout": dropout, "use_rslora": use_rslora,
        "target_modules": sorted(target_modules), "bias": "none", "fan_in_fan_out": fan_in_fan_out,
        "modules_to_save": None, "init_lora_weights": True, "inference_mode": True,
        "rank_pattern": {}, "alpha_pattern": {}, "use_dora": False, "layers_to_transform": None,
    }
    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})
    (folder / "adapter_config.json").write_text(json.dumps(config, indent=2))
    return folder


def load_adapter(model: nn.Module, path) -> nn.Module:
    """Apply a PEFT LoRA folder onto one of our models (in place): apply_lora with its r,
    alpha, dropout, rsLoRA on exactly the modules its tensors name, then copy A and B."""
    folder = Path(path)
    for f in ("adapter_config.json", "adapter_model.safetensors"):
        if not (folder / f).exists():
            raise FileNotFoundError(f"{folder} has no {f}: not a PEFT adapter folder")
    cfg = read_json(folder / "adapter_config.json")  # a bad file is named, with line and column
    if cfg.get("peft_type") != "LORA":
        raise ValueError(f"adapter peft_type is {cfg.get('peft_type')!r}; only 'LORA' is supported")
    allowed = {"bias": ("none",), "use_dora": (False, None), "modules_to_save": (None, []),
               "rank_pattern": ({}, None), "alpha_pattern": ({}, None)}
    unsupported = {k: cfg[k] for k, ok in allowed.items() if k in cfg and cfg[k] not in ok}
    if unsupported:
        raise ValueError(f"adapter settings not supported: {unsupported}")
    names, _ = _hf_names(model)
    ours_of = {t: o for o, t in names.items()}
    tensors = load_safetensors(folder / "adapter_model.safetensors")  # a cut file is named
    key = re.compile(rf"^{re.escape(_PREFIX)}(.+)\.lora_([AB])(?:\.[^.]+)?\.weight$")
    found: dict[str, dict[str, torch.Tensor]] = {}
    unexpected = []
    for k, t in tensors.items():
        m = key.match(k)
        if m is None or m.group(1) not in ours_of:
            unexpected.append(k)
        else:
            found.setdefault(ours_of[m.group(1)], {})[m.group(2)] = t
    missing = [f"{_PREFIX}{names[o]}.lora_{ab}.weight" for o, d in found.items() for ab in "AB" if ab not in d]
    if unexpected or missing or not found:
        raise ValueError(f"adapter {folder} does not fit {type(model).__name__}: "
                         f"missing {missing}, unexpected {unexpected}" + ("" if found else ", no LoRA tensors"))
    apply_lora(model, sorted(found), r=cfg["r"], alpha=cfg["lora_alpha"], dropout=cfg.get("lora_dropout", 0.0),
               use_rslora=cfg.get("use_rslora", False))
    mods = lora_modules(model)
    wrong = [f"{o}.lora_{ab} {tuple(d[ab].shape)} != {tuple(getattr(mods[o], 'lora_' + ab).shape)}"
             for o, d in found.items() for ab in "AB" if d[ab].shape != getattr(mods[o], "lora_" + ab).shape]
    if wrong:
        raise ValueError(f"adapter {folder}: wrong shapes: {wrong}")
    with torch.no_grad():
        for o, d in found.items():
            mods[o].lora_A.copy_(d["A"])
            mods[o].lora_B.copy_(d["B"])
    return model
