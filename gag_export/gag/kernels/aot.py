"""Build the fused GAG kernel ahead of time for an NVIDIA architecture, on any machine.

Triton lowers a kernel to PTX and assembles it with the ptxas it ships, with no GPU involved. So
what the kernel costs on an H200 (sm_90), a B200 (sm_100), an RTX 4090 (sm_89), a Jetson AGX Orin
(sm_87) or a T4 (sm_75) can be read on a CPU-only machine: registers per thread, local memory (register spills), shared memory, and the SASS
instructions one thread executes. `tests/test_kernel_build.py` builds every kind of tile the
dispatch can pick for the GPUs in `ARCHS` and checks it fits; `benchmarks/kernel_resources.py`
prints the table. What this cannot tell is time: that needs the GPU (`benchmarks/bench_gpu.py`).

Imports Triton: import it only where Triton is installed.
"""

from __future__ import annotations

import re
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from ...core.errors import MissingDependencyError
from . import guidance_schedule
from .triton_gag import gag_attention_kernel, kernel_constants


@dataclass(frozen=True)
class Arch:
    capability: int
    gpus: str
    shared_memory_per_block: int  # bytes a block may opt in to (CUDA programming guide, per capability)


ARCHS = {
    "sm_75": Arch(75, "T4", 64 * 1024),
    "sm_80": Arch(80, "A100", 163 * 1024),
    "sm_86": Arch(86, "RTX 3090, A10, A40", 99 * 1024),
    "sm_87": Arch(87, "Jetson AGX Orin", 163 * 1024),
    "sm_89": Arch(89, "RTX 4090, L4, L40", 99 * 1024),
    "sm_90": Arch(90, "H100, H200", 227 * 1024),
    "sm_100": Arch(100, "B200, GB200", 227 * 1024),  # CUTLASS's sm100_smem_capacity_bytes, 232448
    "sm_120": Arch(120, "RTX 5090, RTX PRO 6000", 99 * 1024),  # sm120_smem_capacity_bytes, 101376
}

_POINTER_TYPES = {torch.float16: "*fp16", torch.bfloat16: "*bf16", torch.float32: "*fp32"}
_FLOAT_ARGS = ("scale_f", "eta_f", "zeta_f", "sm_scale", "tau_hi")


@dataclass(frozen=True)
class KernelBuild:
    """One ahead-of-time build: the inputs it was built for and what ptxas reports."""

    arch: str
    dtype: str
    lk: int
    head_dim: int
    block_m: int
    block_n: int  # main key tile
    block_n2: int  # tail key tile (0: none)
    num_warps: int
    registers: int  # per thread
    local_bytes: int  # per thread; > 0 means registers spilled to memory
    shared_bytes: int  # per block, as Triton checks it at launch
    sass_instructions: int  # in the binary; loops count once
    loops: tuple[tuple[str, int], ...]  # ("bisect" | "newton", instructions in the body), in order

    def executed_instructions(self, bisect_iters: int, newton_iters: int) -> int:
        """Instructions one thread executes: loops counted by their trip counts (unrolled ones are in full)."""
        trips = {"bisect": bisect_iters, "newton": newton_iters}
        return self.sass_instructions + sum((trips[kind] - 1) * body for kind, body in self.loops)

    def blocks_per_sm(self, registers_per_sm: int = 65536, max_warps_per_sm: int = 64) -> int:
        """Resident blocks per SM, as registers, warps and shared memory allow (occupancy)."""
        per_warp = -(-self.registers // 8) * 8 * 32  # allocated in units of 8 registers per thread
        by_registers = registers_per_sm // (per_warp * self.num_warps)
        by_shared = ARCHS[self.arch].shared_memory_per_block // max(self.shared_bytes, 1)
        return min(by_registers, by_shared, max_warps_per_sm // self.num_warps)


def _tool(name: str) -> Path:
    path = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name
    if not path.exists():
        raise MissingDependencyError(f"Triton's {name} is not at {path}; this Triton build cannot assemble for NVIDIA GPUs")
    return path


def _signature(dtype: torch.dtype, mask_mode: int, constants: dict, out_dtype: torch.dtype) -> tuple[dict, dict]:
    """Argument types and alignment hints close to what a launch with contiguous tensors gets.

    Triton's launcher marks pointers and integers divisible by 16 ("tt.divisibility") and makes
    integers equal to 1 (the innermost strides, `_unit_strides`) constants. Here the pointers are
    marked and the unit strides are constants; the other integers (outer strides, lengths) are left
    unmarked, since their values depend on the call, so a launch whose strides are multiples of 16
    may compile its address arithmetic a little tighter than this build.
    """
    names = gag_attention_kernel.arg_names
    mask_type = "*u8" if mask_mode == 2 else _POINTER_TYPES[dtype]
    signature, attrs = {}, {}
    for index, name in enumerate(names):
        if name in constants:
            signature[name] = "constexpr"
        elif name in ("Q", "K", "V", "Out"):
            pointer = _POINTER_TYPES[out_dtype if name == "Out" else dtype]
            signature[name], attrs[(index,)] = pointer, [["tt.divisibility", 16]]
        elif name == "Mask":
            signature[name], attrs[(index,)] = mask_type, [["tt.divisibility", 16]]
        elif name == "Params":
            signature[name], attrs[(index,)] = "*fp32", [["tt.divisibility", 16]]
        elif name in _FLOAT_ARGS:
            signature[name] = "fp32"
        else:
            signature[name] = "i32"
    return signature, attrs


def _unit_strides(mask_mode: int) -> dict:
    # contiguous [B, H, L, d] tensors: the last stride is 1; a broadcast mask's is 1 as well
    ones = {"stride_qd": 1, "stride_kd": 1, "stride_vd": 1, "stride_od": 1}
    if mask_mode:
        ones["stride_mn"] = 1
    return ones


def compile_kernel(
    arch: str,
    dtype: torch.dtype,
    lk: int,
    head_dim: int,
    mask_mode: int = 0,
    params_from_ptr: bool = False,
    block_m: int | None = None,
    num_warps: int | None = None,
    mask_per_key: bool = False,
    minus_dense: bool = False,
    maxnreg: int | None = None,
    late_values: bool = False,
) -> KernelBuild:
    """Compile the kernel for `arch` (a key of `ARCHS`) as a launch on these shapes would.

    `mask_mode`: 0 none, 1 additive, 2 boolean; `mask_per_key`: one row of keys for all queries;
    `minus_dense`: the joint-attention (FLUX) form, writing GAG - dense in fp32; `maxnreg`: a
    register cap per thread (see `triton_gag.kernel_constants`).
    """
    if arch not in ARCHS:
        raise ValueError(f"arch must be one of {sorted(ARCHS)}, got {arch!r}")
    bisect_iters, newton_iters = guidance_schedule()
    constants, options = kernel_constants(
        dtype, lk, head_dim, mask_mode, params_from_ptr, bisect_iters, newton_iters, block_m, num_warps, mask_per_key,
        minus_dense, maxnreg, late_values,
    )
    constants = {**constants, **_unit_strides(mask_mode)}
    signature, attrs = _signature(dtype, mask_mode, constants, out_dtype=torch.float32 if minus_dense else dtype)
    source = ASTSource(fn=gag_attention_kernel, signature=signature, constexprs=constants, attrs=attrs)
    compiled = triton.compile(source, target=GPUTarget("cuda", ARCHS[arch].capability, 32), options=options)
    registers, local, instructions, loops = _read_cubin(compiled.asm["cubin"])
    return KernelBuild(
        arch=arch, dtype=str(dtype).removeprefix("torch."), lk=lk, head_dim=head_dim,
        block_m=constants["BLOCK_M"], block_n=constants["BLOCK_N"], block_n2=constants["BLOCK_N2"], num_warps=options["num_warps"],
        registers=registers, local_bytes=local, shared_bytes=int(compiled.metadata.shared),
        sass_instructions=instructions, loops=loops,
    )


_INSTRUCTION = re.compile(r"^\s+/\*[0-9a-f]{4,}\*/\s+(.*)$")
_LABEL = re.compile(r"^(\.L_x_\d+):")
# "BRA `(.L_x_5)", "@!P0 BRA `(.L_x_4)", and on Blackwell "BRA.U UP2, `(.L_x_18)" (uniform predicate)
_BRANCH_TARGET = re.compile(r"BRA(?:\.\w+)*\s+(?:!?U?P\w*,\s*)?`?\(?(\.L_x_\d+)")


def _read_cubin(cubin: bytes) -> tuple[int, int, int, tuple[tuple[str, int], ...]]:
    """(registers, local bytes, SASS instruction count, loops) of a one-kernel cubin.

    Each loop is (kind, instructions in its body). The kernel's loops are the bisection and the
    Newton steps, told apart by the division only Newton has (MUFU.RCP); ptxas unrolls either
    at times, and an unrolled loop is simply counted in full. Not loops of the kernel, and not
    listed: on Blackwell (sm_100) the tensor-memory allocation retries with a NANOSLEEP in the
    prologue, and the waits for asynchronous MMAs poll in blocks placed after EXIT that branch
    back into the body; both run as often as the hardware makes them wait, so they count once.
    """
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp, "kernel.cubin")
        path.write_bytes(cubin)
        usage = _run(_tool("cuobjdump"), "--dump-resource-usage", path)
        sass = _run(_tool("nvdisasm"), "-c", path)
    registers = int(re.search(r"REG:(\d+)", usage).group(1))
    local = int(re.search(r"LOCAL:(\d+)", usage).group(1))
    labels, instructions, loops, exited = {}, [], [], False
    for line in sass.splitlines():
        label = _LABEL.match(line.strip())
        if label:
            labels[label.group(1)] = len(instructions)
            continue
        instruction = _INSTRUCTION.match(line)
        if not instruction:
            continue
        text = instruction.group(1)
        target = _BRANCH_TARGET.search(text)
        instructions.append(text)
        exited = exited or text.startswith("EXIT")
        # A branch backwards closes a loop; one to itself is the trap ptxas puts after EXIT.
        start = labels.get(target.group(1), len(instructions)) if target else len(instructions)
        if start < len(instructions) - 1 and not exited:
            body = instructions[start:]
            if not any("NANOSLEEP" in i for i in body):
                loops.append(("newton" if any("MUFU.RCP" in i for i in body) else "bisect", len(body)))
    return registers, local, len(instructions), tuple(loops)


def _run(tool: Path, *args) -> str:
    return subprocess.run([str(tool), *map(str, args)], check=True, capture_output=True, text=True).stdout
