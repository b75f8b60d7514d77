"""Every listed GPU autotune config fits an H100/H200: no register spills, shared memory within the
per-block limit (examples/kernel_resources.py compiles for sm_90 with Triton's compiler and ptxas,
no GPU needed).

Register allocation depends on the compiler, so there is one committed table per Triton version
(each records its triton / ptxas versions): examples/results/sm90_kernels.json (triton 3.9) and
examples/results/sm90_kernels_triton36.json (triton 3.6, torch 2.11). The tests read the table of
the running Triton (no table for it fails), and check it: every listed config of every dtype and
every row tile (16/32/64/128) is in it, and none spills or overflows shared memory (bf16, fp16,
tf32 without exception; fp32 IEEE except the few rows of KNOWN_SPILLS, bounded in bytes). A fresh
compile of a few representative kernels x configs (slow) keeps the table from drifting from the
code unnoticed. Regenerate with ``python examples/kernel_resources.py --arch 90 --acts swiglu --out ...``
under the Triton in question.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "examples" / "results"
# Triton major.minor -> its table
TABLES = {"3.9": RESULTS / "sm90_kernels.json", "3.6": RESULTS / "sm90_kernels_triton36.json"}
TOOL = REPO / "examples" / "kernel_resources.py"
# dtype labels of the table by operand element size (launch_utils.DtypeConfigs keys)
LABELS_BY_ITEMSIZE = {2: ("bf16", "fp16"), 4: ("fp32", "fp32_tf32")}


def _triton_minor() -> str:
    import triton

    return ".".join(triton.__version__.split(".")[:2])


def _table_path() -> Path:
    import triton

    minor = _triton_minor()
    assert minor in TABLES, (f"no sm_90 resource table for triton {triton.__version__}: generate one with "
                             f"examples/kernel_resources.py and add it to TABLES")
    return TABLES[minor]


def _table() -> dict:
    path = _table_path()
    assert path.exists(), f"{path} missing: run python examples/kernel_resources.py --arch 90 --acts swiglu --out {path}"
    table = json.loads(path.read_text())
    made_with = ".".join(table["versions"]["triton"].split(".")[:2])
    assert made_with == _triton_minor(), f"{path.name} was made with triton {table['versions']['triton']}"
    return table


def _dtype_autotuners():
    """(kernel name, DtypeConfigs) of every autotuned kernel whose configs are chosen per dtype."""
    import importlib
    import pkgutil

    import triton

    import moe_inductor.kernels as pkg
    from moe_inductor.kernels.launch_utils import DtypeConfigs

    found = []
    for info in pkgutil.iter_modules(pkg.__path__):
        mod = importlib.import_module(f"{pkg.__name__}.{info.name}")
        for value in vars(mod).values():
            if isinstance(value, triton.runtime.autotuner.Autotuner):
                owner = getattr(value.early_config_prune, "__self__", None)
                found.append((f"{info.name}.{value.base_fn.__name__}", owner if isinstance(owner, DtypeConfigs) else None))
    return found


def _config_dict(cfg) -> dict:
    return {**cfg.kwargs, "num_warps": cfg.num_warps, "num_stages": cfg.num_stages}


GEMM_KERNELS = ("_up_proj_kernel", "_sorted_gemm_kernel", "_dh_kernel", "_weight_grad_kernel")


def test_every_gemm_autotuner_chooses_configs_per_dtype():
    """The tl.dot kernels stage operand tiles in shared memory (2x the bytes in fp32) and fp32 runs
    the dot on CUDA cores: their candidates must be chosen per dtype. (The combine kernels use no
    shared memory for operands; their single list is checked by the table like every other.)"""
    owners = {name.split(".")[-1]: owner for name, owner in _dtype_autotuners()}
    for gemm in GEMM_KERNELS:
        assert gemm in owners, f"{gemm} is not autotuned any more: update this test"
        assert owners[gemm] is not None, f"{gemm}: autotune configs not chosen per dtype (launch_utils.DtypeConfigs)"


# Rows of a table known not to fit, by triton major.minor: (kernel, dtype, (BLOCK_N, BLOCK_K, warps,
# stages), BLOCK_M) -> the most spill bytes allowed. Only fp32 (IEEE, CUDA-core FMA) may appear
# here: a bf16, fp16 or tf32 row that spills or overflows shared memory always fails. Triton 3.9
# spills a few bytes in two fp32 GEMMs at the 32-row tile (decode / graph shapes); since the
# up-projection's single [gate | up] dot, nothing spills under triton 3.6.
_UP, _GEMM = "grouped_gemm._up_proj_kernel", "grouped_gemm._sorted_gemm_kernel"
KNOWN_SPILLS = {
    "3.6": {},
    "3.9": {
        (_UP, "fp32", (64, 16, 8, 3), 32): 4,
        (_GEMM, "fp32", (64, 64, 8, 3), 32): 8,
    },
}


def _known_spill(e: dict) -> bool:
    c = e["config"]
    key = (e["kernel"], e["dtype"], (c.get("BLOCK_N"), c.get("BLOCK_K"), c["num_warps"], c["num_stages"]),
           e["variant"].get("BLOCK_M"))
    allowed = KNOWN_SPILLS.get(_triton_minor(), {}).get(key)
    why = e["why_not_ok"]
    return (allowed is not None and e["dtype"] == "fp32" and len(why) == 1 and why[0].startswith("spills")
            and max(e["spill_stores"], e["spill_loads"]) <= allowed)


def test_table_rows_on_sm90_fit():
    """No entry of the running Triton's table spills or exceeds shared memory on sm_90 (bf16, fp16,
    tf32 always; fp32 IEEE except the rows in KNOWN_SPILLS, each at most its bytes)."""
    table = _table()
    sm90 = [e for e in table["entries"] if e["arch"] == 90]
    assert sm90, "no sm_90 rows in the table"
    bad = [f"{e['kernel']} {e['dtype']} {e['config']} {e.get('variant')}: {'; '.join(e['why_not_ok'])}"
           for e in sm90 if not e["ok"] and not _known_spill(e)]
    assert not bad, "configs that do not fit sm_90:\n" + "\n".join(bad)
    # the verdict is recomputed from the raw figures, not trusted from the file
    for e in sm90:
        if not _known_spill(e):
            assert e["spill_stores"] == 0 and e["spill_loads"] == 0, e
        assert e["smem"] <= e["smem_limit"] == 232448, e
        assert e["registers"] * e["config"]["num_warps"] * 32 <= 65536, e
    for e in sm90:
        if e["dtype"] != "fp32":
            assert e["ok"] and not e["spill_stores"] and not e["spill_loads"], e
    assert not table["discovery_errors"], table["discovery_errors"]
    assert not table["never_launched"], f"kernels no scenario launched (not in the table): {table['never_launched']}"


ROW_TILES = (16, 32, 64, 128)  # every row tile config.kernel_tile_m can choose (BLOCK_M of the row-tiled GEMMs)


def test_table_covers_every_listed_config():
    """Every config of every per-dtype list appears in the table for sm_90 and that dtype, and for
    the row-tiled GEMMs (a BLOCK_M specialisation) at every row tile: a list edited without
    regenerating the table fails here."""
    from moe_inductor.kernels import config

    assert {config.kernel_tile_m(a, e) for a, e in ((16, 64), (256, 8), (512, 8), (1024, 4))} == set(ROW_TILES)
    table = _table()
    rows = {}
    for e in table["entries"]:
        if e["arch"] == 90:
            rows.setdefault((e["kernel"], e["dtype"]), []).append((e["config"], e["variant"].get("BLOCK_M")))
    missing = []
    for name, owner in _dtype_autotuners():
        if owner is None:
            continue
        row_tiled = any(m is not None for (k, _), rs in rows.items() if k == name for _, m in rs)
        for itemsize, configs in owner.by_itemsize.items():
            for label in LABELS_BY_ITEMSIZE[itemsize]:
                have = rows.get((name, label), [])
                for c in configs:
                    for tile in ROW_TILES if row_tiled else (None,):
                        if (_config_dict(c), tile) not in have:
                            missing.append(f"{name} {label} {_config_dict(c)} BLOCK_M={tile}")
    assert not missing, "listed configs absent from the table (regenerate it):\n" + "\n".join(missing)
    assert {"bf16", "fp16", "fp32", "fp32_tf32"} <= {e["dtype"] for e in table["entries"]}


def test_table_gemm_main_loops_use_wgmma_for_half_precision():
    """bf16/fp16 (and tf32) GEMM kernels use Hopper's wgmma on sm_90 (row tiles of 64+ rows; the
    16-row decode tile has to fall back to mma.sync) and mma.sync on sm_80; fp32 with
    input_precision="ieee" uses neither (CUDA-core FMA, the price of exact fp32 products)."""
    table = _table()
    checked = 0
    for e in table["entries"]:
        if e["kernel"].split(".")[-1] not in GEMM_KERNELS:
            continue
        checked += 1
        what = f"{e['kernel']} {e['dtype']} sm_{e['arch']} {e['config']} {e['variant']}"
        if e["dtype"] in ("bf16", "fp16", "fp32_tf32"):
            if e["arch"] == 90 and e["variant"].get("BLOCK_M", 128) >= 64:
                assert e["uses_wgmma"], f"no wgmma: {what}"
            else:
                assert e["uses_mma_sync"] or e["uses_wgmma"], f"no tensor-core MMA: {what}"
        else:
            assert not e["uses_wgmma"] and not e["uses_mma_sync"], f"fp32 (ieee) on tensor cores: {what}"
        assert e["uses_cp_async"], f"main loop not pipelined with cp.async: {what}"
    assert checked


def test_ptxas_is_available():
    """The fresh compile below needs ptxas: Triton's bundled one (or TRITON_PTXAS_PATH); never skipped."""
    from triton.backends.nvidia import compiler as nv

    for arch in (80, 90):
        path = nv.get_ptxas(arch).path
        assert os.access(path, os.X_OK), f"ptxas for sm_{arch} not executable: {path}"


def test_dtype_configs_prune_by_operand_size():
    import triton

    from moe_inductor.kernels.launch_utils import DtypeConfigs

    half = [triton.Config({"BLOCK_N": 128}, num_warps=8, num_stages=4), triton.Config({"BLOCK_N": 64}, num_warps=4, num_stages=4)]
    full = [triton.Config({"BLOCK_N": 64}, num_warps=4, num_stages=4), triton.Config({"BLOCK_N": 32}, num_warps=4, num_stages=2)]
    dc = DtypeConfigs({2: half, 4: full}, triton.Config({"BLOCK_N": 16}, num_warps=1, num_stages=1))
    assert dc.gpu_configs == [half[0], half[1], full[1]]  # union, shared config once
    idx = torch.zeros(4, dtype=torch.int32)  # integer tensors before the operand are skipped
    for dt, want in ((torch.bfloat16, half), (torch.float16, half), (torch.float32, full), (torch.float8_e4m3fn, half)):
        got = dc.prune(dc.gpu_configs, {"rows": idx, "x": torch.zeros(2, dtype=dt), "n": 3})
        assert got == want, dt
    with pytest.raises(ValueError, match="no floating-point tensor"):
        dc.prune(dc.gpu_configs, {"rows": idx})
    with pytest.raises(ValueError, match="non-empty"):
        DtypeConfigs({2: half, 4: []}, half[0])


def test_verdict_flags_spills_and_shared_memory():
    """The parser and the verdict the table is built with, on a ptxas -v log of the usual form."""
    sys.path.insert(0, str(TOOL.parent))
    try:
        import kernel_resources as kr
    finally:
        sys.path.remove(str(TOOL.parent))
    log = (
        "ptxas info    : Compiling entry function 'other' for 'sm_90a'\n"
        "ptxas info    : Used 40 registers\n"
        "    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads\n"
        "ptxas info    : Compiling entry function 'k' for 'sm_90a'\n"
        "ptxas info    : Function properties for k\n"
        "    8 bytes stack frame, 12 bytes spill stores, 16 bytes spill loads\n"
        "ptxas info    : Used 255 registers, used 1 barriers, 8 bytes cumulative stack size\n"
    )
    r = kr.parse_ptxas_log(log, "k")
    assert (r["registers"], r["spill_stores"], r["spill_loads"], r["stack_frame"]) == (255, 12, 16, 8)
    entry = dict(r, arch=90, smem=240 * 1024, config={"num_warps": 8})
    ok, why = kr.verdict(entry)
    assert not ok and any("spills" in w for w in why) and any("shared memory" in w for w in why)
    ok, why = kr.verdict(dict(entry, spill_stores=0, spill_loads=0, smem=200 * 1024))
    assert ok and not why
    ok, why = kr.verdict(dict(entry, spill_stores=0, spill_loads=0, smem=0, config={"num_warps": 16}))
    assert not ok and "registers" in why[0]  # 255 x 512 threads > 64K registers


@pytest.mark.slow
def test_fresh_compile_of_representative_configs(tmp_path):
    """Compile the up-projection for sm_90 now (gathered X, two accumulators, the heaviest flags:
    biases, interleaved gate/up, forward and H-recompute variants), every listed bf16 and fp32
    config, in a fresh Triton cache: all must fit, and the committed table must list each of them."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path / "triton_cache")
    out = tmp_path / "fresh.json"
    cmd = [sys.executable, str(TOOL), "--arch", "90", "--dtypes", "bf16,fp32", "--acts", "swiglu",
           "--shapes", "prefill", "--scenarios", "flags", "--kernels", "_up_proj_kernel", "--out", str(out)]
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900, cwd=REPO)
    assert out.exists(), res.stdout[-3000:] + res.stderr[-3000:]
    fresh = json.loads(out.read_text())
    entries = fresh["entries"]
    assert {e["kernel"].split(".")[-1] for e in entries} == {"_up_proj_kernel"}
    assert {e["dtype"] for e in entries} == {"bf16", "fp32"}
    assert all(e["ptxas"] == "triton" for e in entries), "expected Triton's own ptxas log (fresh cache)"
    bad = [f"{e['kernel']} {e['dtype']} {e['config']}: {e['why_not_ok']}" for e in entries if not e["ok"]]
    assert not bad, "\n".join(bad)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    # the table must describe the code as it is: every freshly compiled (kernel, dtype, config,
    # variant) is in it and fits there too. Register counts are not compared: they move with any
    # kernel edit and compiler version, and the fit is what matters.
    table = _table()
    key = lambda e: (e["kernel"], e["dtype"], e["arch"], json.dumps(e["config"], sort_keys=True),
                     json.dumps(e["variant"], sort_keys=True))
    committed = {key(e): e for e in table["entries"]}
    stale = [key(e) for e in entries if key(e) not in committed]
    assert not stale, f"{_table_path().name} is stale (regenerate it); not in it:\n" + "\n".join(map(str, stale))
    assert all(committed[key(e)]["ok"] for e in entries)
