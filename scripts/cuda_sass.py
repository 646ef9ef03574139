#!/usr/bin/env python3
"""Registers, spills and where they are, for one of our CUDA sources, on a machine without a GPU.

    python3 scripts/cuda_sass.py src/attention/cuda/pruner.cu [--kernel prune_kernel]

Compiles the file for sm_90a with the build's optimisation flags and line info to a cubin, prints
ptxas's registers and spill bytes per kernel, and, with nvdisasm, the instruction count of each
kernel and the source lines of its spill stores and reloads (SASS STL / LDL, marked SpillRefill),
plus the span of its tensor-core loop (first to last IMMA / HMMA) so that a spill inside a hot loop
stands out. The kernels here sit at their register caps (docs/CUDA.md): check a change with this
before timing it on the GPU machine.

nvdisasm is not in the CUDA toolkit installed here; it comes from PyPI's nvidia-cuda-nvdisasm wheel,
pinned by version and sha256, unpacked once into the twilight cache (~/.cache/twilight/tools).
"""
import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections import Counter
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from fetch_models import cache_dir, sha256_file  # noqa: E402  (the twilight cache, as every fetcher)

WHEEL = ("nvidia-cuda-nvdisasm", "13.5.37", "d3fdbdd49fa53e2e4aacd3db8259d052bd2b049ececdcb69e92e083c6728e7ca")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def nvdisasm():
    name, ver, sha = WHEEL
    dest = os.path.join(str(cache_dir()), "tools", f"nvdisasm-{ver}")
    exe = os.path.join(dest, "nvdisasm")
    if os.path.exists(exe):
        return exe
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:", "-d", tmp,
                        f"{name}=={ver}"], check=True)
        whl = [f for f in os.listdir(tmp) if f.endswith(".whl")]
        if len(whl) != 1:
            sys.exit(f"cuda_sass: expected one wheel for {name}=={ver}, got {whl}")
        path = os.path.join(tmp, whl[0])
        got = sha256_file(Path(path))
        if got != sha:
            sys.exit(f"cuda_sass: sha256 mismatch for {whl[0]}: {got}, want {sha}")
        with zipfile.ZipFile(path) as z:
            member = [m for m in z.namelist() if m.endswith("/bin/nvdisasm")]
            if not member:
                sys.exit(f"cuda_sass: no bin/nvdisasm in {whl[0]}")
            os.makedirs(dest, exist_ok=True)
            with z.open(member[0]) as src, open(exe + ".part", "wb") as out:
                shutil.copyfileobj(src, out)
    os.chmod(exe + ".part", 0o755)
    os.replace(exe + ".part", exe)
    return exe


def demangle(names):
    if not names or not shutil.which("c++filt"):
        return {n: n for n in names}
    out = subprocess.run(["c++filt"], input="\n".join(names), capture_output=True, text=True, check=True).stdout
    return dict(zip(names, out.splitlines()))


def short(name):
    """The demangled name without return type, namespaces and parameter list: prune_kernel<128, 2>."""
    name = name.replace("(anonymous namespace)::", "")
    if name.endswith(")"):  # the parameter list: from its matching '('
        depth = 0
        for i in range(len(name) - 1, -1, -1):
            depth += {")": 1, "(": -1}.get(name[i], 0)
            if depth == 0:
                name = name[:i]
                break
    name = re.sub(r"^void ", "", name)
    name = re.sub(r"\btw::\w+::(\w+::)*", "", name)
    return name.replace("(int)", "")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("source", help="a .cu file of ours")
    ap.add_argument("--kernel", default="", help="only kernels whose demangled name contains this")
    ap.add_argument("--nvcc", default=shutil.which("nvcc") or "/usr/local/cuda/bin/nvcc")
    args = ap.parse_args()
    if not os.path.exists(args.nvcc):
        sys.exit("cuda_sass: nvcc not found (set --nvcc)")
    with tempfile.TemporaryDirectory() as tmp:
        cubin = os.path.join(tmp, "k.cubin")
        cmd = [args.nvcc, "-DTW_HAVE_CUDA=1", f"-I{ROOT}/src", "-O3", "-DNDEBUG", "-lineinfo", "-std=c++17",
               "--expt-relaxed-constexpr", "--generate-code=arch=compute_90a,code=[sm_90a]", "-Xptxas=-v", "-cubin",
               "-x", "cu", args.source, "-o", cubin]
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode != 0:
            sys.exit(r.stderr)
        # ptxas: "Compiling entry function 'X'", then "N bytes stack frame, S bytes spill stores, L bytes
        # spill loads" and "Used R registers".
        ptx = {}
        cur = None
        for line in r.stderr.splitlines():
            m = re.search(r"Compiling entry function '([^']+)'", line)
            if m:
                cur = m.group(1)
                ptx[cur] = {}
                continue
            m = re.search(r"Function properties for (\S+)", line)
            if m and m.group(1) != cur:
                cur = None  # a device function's block: not the kernel's
            if cur is None:
                continue
            m = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", line)
            if m:
                ptx[cur]["spill"] = (int(m.group(1)), int(m.group(2)))
            m = re.search(r"Used (\d+) registers", line)
            if m:
                ptx[cur]["regs"] = int(m.group(1))
        sass = subprocess.run([nvdisasm(), "-g", "-c", cubin], capture_output=True, text=True, check=True).stdout
    # Per function section: instructions, tensor-core span, spill instructions by source line.
    sections = re.split(r"^\s*\.section\s+\.text\.(\S+?),", sass, flags=re.M)
    names = demangle(list(ptx) + [sections[i] for i in range(1, len(sections), 2)])
    for i in range(1, len(sections), 2):
        mangled, body = sections[i], sections[i + 1]
        nice = names.get(mangled, mangled)
        if args.kernel not in nice:
            continue
        src, n, mma, spills = "?", 0, [], Counter()
        for line in body.splitlines():
            m = re.search(r'//## File "([^"]+)", line (\d+)', line)
            if m:
                src = f"{os.path.relpath(m.group(1), ROOT) if m.group(1).startswith(ROOT) else os.path.basename(m.group(1))}:{m.group(2)}"
                continue
            if not re.search(r"/\*[0-9a-f]{4,}\*/\s+\S", line):
                continue
            n += 1
            if re.search(r"\b[IH]MMA\b", line):
                mma.append(n)
            if "SpillRefill" in line or re.search(r"\b(STL|LDL)\b", line):
                spills[(n, ("store " if "STL" in line else "reload ") + src)] += 1
        info = ptx.get(mangled, {})
        st, ld = info.get("spill", (0, 0))
        print(f"{short(nice)}: {info.get('regs', '?')} registers, spill {st} / {ld} bytes, {n} instructions"
              + (f", MMA span {mma[0]}-{mma[-1]}" if mma else ""))
        for (at, what), c in sorted(spills.items()):
            inside = " (inside the MMA span)" if mma and mma[0] <= at <= mma[-1] else ""
            print(f"    instruction {at}: {what}{inside}")


if __name__ == "__main__":
    main()
