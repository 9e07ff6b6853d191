"""The kernel-static report's reader (ltk/bench/sass.py) on literal SASS and on a real compile,
and its occupancy and ceiling arithmetic (ltk/bench/kernel_static.py)."""
import json
import shutil
from pathlib import Path

import pytest

from ltk.bench import kernel_static as ks
from ltk.bench import sass

# nvdisasm -c style: labels, an outer loop around an inner loop that holds the MMAs, a second
# inner loop without MMAs, a 64-bit division call, and the self-branch padding after EXIT
NVDISASM = """
        /*0000*/                   S2R R0, SR_TID.X ;
.L_x_0:
        /*0010*/                   IMAD R2, R0, 0x4, RZ ;
.L_x_1:
        /*0020*/                   LDGSTS.E.BYPASS.128 [R3], desc[UR4][R4.64] ;
        /*0030*/                   HGMMA.64x128x16.F32.BF16 R24, gdesc[UR8], R24 ;
        /*0040*/                   HGMMA.64x128x16.F32.BF16 R24, gdesc[UR8], R24, gsb0 ;
        /*0050*/                   FFMA R5, R6, R7, R5 ;
        /*0060*/                   MUFU.EX2 R8, R8 ;
        /*0070*/                   CALL.REL.NOINC `($__internal_0_$__cuda_sm20_div_s64) ;
        /*0080*/                   LOP3.LUT R9, R9, 0xf, RZ, 0xc0, !PT ;
        /*0090*/              @P0 BRA `(.L_x_1) ;
.L_x_2:
        /*00a0*/                   LDG.E R10, desc[UR4][R4.64] ;
        /*00b0*/                   IADD3 R11, R11, 0x1, RZ ;
        /*00c0*/                   STL [R1], R10 ;
        /*00d0*/              @P1 BRA `(.L_x_2);
        /*00e0*/              @P2 BRA `(.L_x_0) ;
        /*00f0*/                   EXIT ;
.L_x_3:
        /*0100*/                   BRA `(.L_x_3);
"""
# cuobjdump -sass style: hex targets, mma.sync on sm_80
CUOBJDUMP = """
        /*0000*/                   MOV R1, c[0x0][0x28] ;
        /*0010*/                   LDSM.16.M88.4 R4, [R2] ;
        /*0020*/                   HMMA.16816.F32.BF16 R8, R4, R6, R8 ;
        /*0030*/                   HMMA.16816.F32.BF16 R12, R4, R7, R12 ;
        /*0040*/                   ISETP.GE.AND P0, PT, R3, c[0x0][0x17c], PT ;
        /*0050*/              @!P0 BRA 0x10 ;
        /*0060*/                   EXIT ;
"""


def test_loops_innermost_and_hottest_from_backward_branches():
    insts = sass.parse_sass(NVDISASM)
    assert len(insts) == 17 and insts[2].opcode == "LDGSTS.E.BYPASS.128"
    assert sass.loops(insts) == [(0x10, 0xe0), (0x20, 0x90), (0xa0, 0xd0)]  # the self-branch is no loop
    assert sass.innermost(sass.loops(insts)) == [(0x20, 0x90), (0xa0, 0xd0)]
    assert sass.hottest_innermost_loop(insts) == (0x20, 0x90)  # the one with the MMAs, not the longer one
    mix = sass.instruction_mix(insts, (0x20, 0x90))
    assert {k: v for k, v in mix.items() if v} == dict(tensor=2, fp=1, int=1, mufu=1, ld_async=1, branch=1, call=1,
                                                        total=8)
    assert sass.instruction_mix(insts, (0xa0, 0xd0))["local"] == 1  # STL: a spill
    assert [i.callee for i in insts if i.base == "CALL"] == ["$__internal_0_$__cuda_sm20_div_s64"]
    # a warp's share of two warpgroup-wide 64×128×16 products
    assert sass.tensor_flops_per_warp(insts, (0x20, 0x90)) == 2 * (2 * 64 * 128 * 16 / 4)


def test_of_two_loops_with_the_same_mmas_the_lean_one_is_hottest():
    """Causal attention's key loop twice: the unmasked copy (run for most key blocks) and the
    masked diagonal copy (once a program, longer): the report reads the unmasked one."""
    insts = sass.parse_sass("""
        /*0000*/                   HGMMA.64x128x16.F32.BF16 R24, gdesc[UR8], R24 ;
        /*0010*/                   MUFU.EX2 R8, R8 ;
        /*0020*/              @P0 BRA `(.L_x_0) ;
        /*0030*/                   HGMMA.64x128x16.F32.BF16 R24, gdesc[UR8], R24 ;
        /*0040*/                   ISETP.GE.AND P1, PT, R3, R4, PT ;
        /*0050*/                   FSEL R8, R8, -INF , P1 ;
        /*0060*/                   MUFU.EX2 R8, R8 ;
        /*0070*/              @P2 BRA `(.L_x_1) ;
        /*0080*/                   EXIT ;
""".replace("`(.L_x_0)", "0x0").replace("`(.L_x_1)", "0x30"))
    assert sass.innermost(sass.loops(insts)) == [(0x0, 0x20), (0x30, 0x70)]
    assert sass.hottest_innermost_loop(insts) == (0x0, 0x20)


def test_cuobjdump_hex_targets_and_mma_sync_shapes():
    insts = sass.parse_sass(CUOBJDUMP)
    assert sass.hottest_innermost_loop(insts) == (0x10, 0x50)
    mix = sass.instruction_mix(insts, (0x10, 0x50))
    assert mix["tensor"] == 2 and mix["ld_shared"] == 1 and mix["int"] == 1 and mix["total"] == 5
    assert sass.tensor_flops_per_warp(insts, (0x10, 0x50)) == 2 * 2 * 16 * 8 * 16
    assert sass.hottest_innermost_loop(sass.parse_sass("        /*0000*/  EXIT ;")) is None


def test_ptxas_log_and_the_models():
    log = ("ptxas info    : Function properties for k\n    616 bytes stack frame, 612 bytes spill stores, "
           "1100 bytes spill loads\nptxas info    : Used 255 registers, used 1 barriers, 616 bytes cumulative stack")
    assert sass.parse_ptxas_log(log) == dict(stack_frame=616, spill_stores=612, spill_loads=1100, regs=255,
                                             barriers=1)
    with pytest.raises(ValueError, match="registers"):
        sass.parse_ptxas_log("nothing")
    h100 = ks.TARGETS["sm_90a"]
    # 128 regs × 128 threads: 16 KiB per CTA of 64K registers -> 4 CTAs; 96 KiB smem + 1 KiB -> 2
    assert ks.resident_ctas(h100, 128, 0, 4) == (4, "regs")
    assert ks.resident_ctas(h100, 64, 96 * 1024, 4) == (2, "smem")
    assert ks.resident_ctas(h100, 32, 0, 1) == (32, "ctas")
    # 4 HGMMA 64×64×16 a k-step: 128 tensor clocks per warp; 1732 issue slots -> 7.4 %
    assert ks.issue_ceiling(h100, 4 * 2 * 64 * 64 * 16 / 4, 1732) == pytest.approx(128 / 1732)
    assert ks.issue_ceiling(h100, 4 * 2 * 64 * 64 * 16 / 4, 100) == 1.0
    assert ks.issue_ceiling(h100, 0.0, 100) is None
    assert ks.issue_ceiling(h100, 4 * 2 * 64 * 64 * 16 / 4, 100, mufu=32) == pytest.approx(128 / 256)  # exp2-bound


def _toolchain() -> str | None:
    try:
        import triton
        from triton.backends import backends
    except ImportError:
        return "needs triton"
    if "nvidia" not in backends:
        return "this Triton has no NVIDIA backend"
    binary = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
    if not all((binary / t).exists() or shutil.which(t) for t in ("ptxas", "nvdisasm")):
        return "Triton's wheel ships no ptxas/nvdisasm here"
    return None


@pytest.mark.slow
@pytest.mark.skipif(_toolchain() is not None, reason=str(_toolchain()))
def test_a_real_compile_is_read(tmp_path):
    """The tutorial matmul at 64×64×64 for sm_80 (the quickest of the report's compiles): ptxas's
    registers, a k-loop with mma.sync and cp.async loads, a ceiling between 0 and 1, and the CSV."""
    rows = ks.run(kernels="floor.matmul 64x64x64", archs="sm_80", dtypes="fp16", jobs=1)
    assert len(rows) == 1
    extra = json.loads(rows[0].extra)
    assert "error" not in extra, extra.get("error")
    assert 0 < extra["regs"] <= 255 and extra["spill_stores"] == 0 and extra["loop"] == "yes"
    assert extra["tensor"] >= 8 and extra["ld_async"] > 0 and extra["call"] == 0  # 64×64×64 in m16n8k16 steps
    assert 0 < extra["ceiling"] <= 1 and rows[0].pct_of_peak == pytest.approx(100 * extra["ceiling"])
    assert "Kernels, statically (sm_80, fp16)" in rows.sections
    rows.write_beside(tmp_path / "r")
    assert (tmp_path / "r.csv").read_text().count("\n") == 2  # header + one row


def test_readme_static_block_comes_from_the_newest_report():
    """README's "Kernels, statically" table is the committed report's sm_90a/bf16 table, columns chosen."""
    from ltk.bench import readme_results as rr
    from ltk.bench.results import collect

    results = collect(rr.ROOT / "ltk" / "bench" / "results")
    block = rr.static_block(results, rr.ROOT)
    assert block.startswith(rr.STATIC_BEGIN) and block.endswith(rr.STATIC_END)
    assert "| kernel | provider | candidate | regs |" in block and "| nf4.matmul_fwd | ours |" in block
    assert "No kernel-static report" in rr.static_block([r for r in results if r.what != "kernel-static"], rr.ROOT)
    readme = (rr.ROOT / "README.md").read_text(encoding="utf-8")
    assert block in readme  # regenerate with: python -m ltk.bench.readme_results
