"""Reading a compiled kernel: its resources (ptxas) and the instruction mix of its innermost loop (SASS).

Triton compiles a kernel to PTX, ptxas turns that into SASS, the GPU's machine code, inside a
cubin. Triton's wheel ships the three NVIDIA tools needed to read the result on a machine
without a GPU (triton/backends/nvidia/bin): ptxas, whose `-v` log states registers per thread
and spill bytes; cuobjdump; and nvdisasm, which prints the SASS with branch targets as labels.

    usage = parse_ptxas_log(log)          # {"regs": 255, "spill_stores": 612, "spill_loads": 1100, ...}
    insts = parse_sass(nvdisasm_text)     # [Inst(addr, opcode, target), ...]; cuobjdump -sass works too
    loop  = hottest_innermost_loop(insts) # (start, end) addresses, or None for straight-line code
    mix   = instruction_mix(insts, loop)  # counts by category (CATEGORIES), over the loop's body

Loops are found from backward branches: a branch at address b to a target t ≤ b closes a loop
whose body is [t, b] (the compiler lays a loop out as its body followed by the branch back).
Self-branches (`BRA` to itself, the padding after EXIT) are no loops. A loop is innermost when
no other loop lies strictly inside it; of the innermost loops the hottest is the one with the
most tensor-core instructions (the main k-loop or key loop of a GEMM or attention kernel
carries the MMAs), ties broken by the fewest instructions (causal attention peels a masked
copy of its key loop for the diagonal blocks, run once a program; the unmasked copy runs for
the others); in a kernel without MMAs, the longest loop. Counts are static: each instruction
of the body once, whichever way its forward branches (masks, 64-bit division's slow path) go
at run time.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

# Categories of opcodes, by the part before the first dot ("HGMMA.64x64x16.F32.BF16" -> "HGMMA").
# Uniform-datapath integer ops (U*) issue from the same scheduler slots, so they count as integer.
TENSOR = {"HGMMA", "HMMA", "IMMA", "DMMA", "BMMA", "QGMMA", "IGMMA", "BGMMA", "OMMA", "QMMA", "UTCHMMA", "UTCQMMA"}
FP = {"FFMA", "FADD", "FMUL", "FMNMX", "FSETP", "FSEL", "FCHK", "FSET", "FSWZADD", "FRND", "FFMA2", "FADD2",
      "FMUL2", "HFMA2", "HADD2", "HMUL2", "HMNMX2", "HSETP2", "HSET2", "DFMA", "DADD", "DMUL", "DSETP"}
INT = {"IMAD", "IADD3", "IADD", "LOP3", "LOP", "SHF", "SHL", "SHR", "LEA", "ISETP", "IMNMX", "VIADD", "VIADDMNMX",
       "VIMNMX", "VIMNMX3", "IABS", "SEL", "PRMT", "SGXT", "BMSK", "POPC", "FLO", "BREV", "IMUL", "ISCADD", "IDP",
       "IMNMX3", "UIMAD", "UIADD3", "ULOP3", "ULOP", "USHF", "ULEA", "UISETP", "USEL", "UPRMT", "USGXT", "UBMSK",
       "UFLO", "UPOPC", "UBREV", "UIMNMX", "UIABS", "UVIADD"}
CONVERT = {"F2F", "F2FP", "I2F", "F2I", "I2FP", "F2IP", "I2I", "FRND"}
MUFU = {"MUFU"}
LOADS = {"UTMALDG": "ld_tma", "LDGSTS": "ld_async", "LDG": "ld_global", "LDS": "ld_shared", "LDSM": "ld_shared",
         "LD": "ld_global"}
LOCAL = {"LDL", "STL"}  # local memory: spills (and stack arrays) live there
BRANCH = {"BRA", "BRX", "JMP", "JMX"}
CALL = {"CALL"}
# The counted columns of `instruction_mix`, in report order ("other" is the rest: moves, stores,
# barriers, shuffles, predicate ops, uniform loads of constants, ...)
CATEGORIES = ("tensor", "fp", "int", "convert", "mufu", "ld_tma", "ld_async", "ld_global", "ld_shared", "local",
              "branch", "call", "other", "total")

_INST = re.compile(r"^\s*/\*(?P<addr>[0-9a-fA-F]+)\*/\s+(?:\{\s*)?(?P<pred>@!?U?P[T0-9]+\s+)?"
                   r"(?P<op>[A-Z][A-Za-z0-9_.]*)(?P<rest>[^;]*);?")
_LABEL = re.compile(r"^\s*(?P<name>[.$\w]+):\s*$")
_TARGET = re.compile(r"`\((?P<label>[^)]+)\)|\b0x(?P<hex>[0-9a-fA-F]+)\b")


@dataclass(frozen=True)
class Inst:
    addr: int
    opcode: str  # the full opcode with its modifiers, e.g. "HGMMA.64x64x16.F32.BF16"
    target: int | None = None  # branch target address, for BRA/BRX/JMP
    callee: str = ""  # CALL's target label, e.g. "$__internal_0_$__cuda_sm20_div_s64"

    @property
    def base(self) -> str:
        return self.opcode.split(".", 1)[0]


def parse_ptxas_log(log: str) -> dict:
    """Registers, spill bytes, stack and barriers from `ptxas -v` output (the last function in it)."""
    out = {}
    for key, pattern in (("stack_frame", r"(\d+) bytes stack frame"), ("spill_stores", r"(\d+) bytes spill stores"),
                         ("spill_loads", r"(\d+) bytes spill loads"), ("regs", r"Used (\d+) registers"),
                         ("barriers", r"used (\d+) barriers")):
        found = re.findall(pattern, log)
        if found:
            out[key] = int(found[-1])
    if "regs" not in out:
        raise ValueError(f"no 'Used N registers' line in this ptxas log: {log[-500:]!r}")
    return out


def parse_sass(text: str) -> list[Inst]:
    """The instructions of SASS text from `nvdisasm` (branch targets as labels) or `cuobjdump -sass`
    (targets as hex addresses), in address order. Labels resolve to the next instruction's address."""
    lines = text.splitlines()
    labels, pending, raw = {}, [], []
    for line in lines:
        if (m := _LABEL.match(line)) and not line.lstrip().startswith("/*"):
            pending.append(m["name"])
            continue
        m = _INST.match(line)
        if m is None:
            continue
        addr = int(m["addr"], 16)
        for name in pending:
            labels[name] = addr
        pending = []
        raw.append((addr, m["op"], m["rest"]))
    insts = []
    for addr, op, rest in raw:
        base, target, callee = op.split(".", 1)[0], None, ""
        t = _TARGET.search(rest)
        if base in BRANCH and t:
            target = labels.get(t["label"]) if t["label"] else int(t["hex"], 16)
        if base in CALL and t:
            callee = t["label"] or t["hex"]
        insts.append(Inst(addr, op, target, callee))
    return insts


def loops(insts: list[Inst]) -> list[tuple[int, int]]:
    """(start, end) address ranges of every loop: a backward branch at `end` to `start` ≤ `end`."""
    found = {(i.target, i.addr) for i in insts if i.target is not None and i.target < i.addr}
    return sorted(found)


def innermost(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """The loops with no other loop strictly inside them."""
    return [a for a in ranges if not any(b != a and a[0] <= b[0] and b[1] <= a[1] for b in ranges)]


def body(insts: list[Inst], loop: tuple[int, int] | None) -> list[Inst]:
    if loop is None:
        return list(insts)
    return [i for i in insts if loop[0] <= i.addr <= loop[1]]


def hottest_innermost_loop(insts: list[Inst]) -> tuple[int, int] | None:
    """The innermost loop with the most tensor-core instructions; among those, the shortest
    (a kernel that peels a masked copy of its loop, as causal attention does for the diagonal
    key blocks, runs that copy once a program and the lean unmasked one for all the other
    blocks); without tensor-core instructions, the longest. None when the code has no loop
    (norms, elementwise kernels: one pass, no loop)."""
    inner = innermost(loops(insts))
    if not inner:
        return None

    def heat(loop):
        b = body(insts, loop)
        tensor = sum(i.base in TENSOR for i in b)
        return tensor, -len(b) if tensor else len(b)
    return max(inner, key=heat)


def category(base: str) -> str:
    for name, ops in (("tensor", TENSOR), ("fp", FP), ("int", INT), ("convert", CONVERT), ("mufu", MUFU),
                      ("local", LOCAL), ("branch", BRANCH), ("call", CALL)):
        if base in ops:
            return name
    return LOADS.get(base, "other")


def instruction_mix(insts: list[Inst], loop: tuple[int, int] | None = None) -> dict[str, int]:
    """Counts per category (CATEGORIES) over the loop's body (the whole code when loop is None)."""
    counts = dict.fromkeys(CATEGORIES, 0)
    for i in body(insts, loop):
        counts[category(i.base)] += 1
        counts["total"] += 1
    return counts


_HGMMA_SHAPE = re.compile(r"^HGMMA\.(\d+)x(\d+)x(\d+)\b")
_HMMA_SHAPES = {"16816": (16, 8, 16), "1688": (16, 8, 8), "16832": (16, 8, 32), "884": (8, 8, 4)}


def tensor_flops_per_warp(insts: list[Inst], loop: tuple[int, int] | None = None) -> float:
    """FLOPs one warp's tensor-core instructions in the body do, in fp16/bf16-equivalent units:
    TF32 counts double (it runs at half the rate), FP8 half. HGMMA (sm_90 wgmma) is issued by each of
    the 4 warps of a warpgroup for one m×n×k product, so a warp's share is a quarter; HMMA
    (mma.sync) is one warp's m×n×k. Shapes come from the opcode (HGMMA.64x128x16, HMMA.16816 =
    m16 n8 k16, HMMA.1688 = m16 n8 k8)."""
    total = 0.0
    for i in body(insts, loop):
        if i.base == "HGMMA" and (m := _HGMMA_SHAPE.match(i.opcode)):
            flops = 2.0 * int(m[1]) * int(m[2]) * int(m[3]) / 4
        elif i.base == "HMMA" and i.opcode.split(".")[1:2] and i.opcode.split(".")[1] in _HMMA_SHAPES:
            mm, nn, kk = _HMMA_SHAPES[i.opcode.split(".")[1]]
            flops = 2.0 * mm * nn * kk
        else:
            continue
        if ".TF32" in i.opcode:
            flops *= 2
        elif ".E4M3" in i.opcode or ".E5M2" in i.opcode:
            flops /= 2
        total += flops
    return total
