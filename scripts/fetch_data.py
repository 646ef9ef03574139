#!/usr/bin/env python3
"""Extract the evaluation text: Jane Austen's six novels, from Debian's r-cran-janeaustenr.

The package (installed by scripts/setup.sh) keeps the novels as R data in a lazy-load database,
/usr/lib/R/site-library/janeaustenr/data/Rdata.{rdx,rdb}: Rdata.rdx is an RDS file (gzip) naming,
per variable, an (offset, length) into Rdata.rdb; each blob there is a 4-byte big-endian
uncompressed length followed by a zlib stream of one serialized R object (here: a character
vector, one element per line of the Project Gutenberg text). Both formats are read with the PyPI
package `rdata` (pinned in requirements-tools.txt); R itself is not used.

Writes to <cache>/data/austen/ (cache as in src/common/paths.cpp):
  <novel>.txt   one per novel, its lines joined with '\n', UTF-8
  all.txt       the six novels in publication order, separated by a blank line
Every output's sha256 is pinned below; a run whose outputs already match is a no-op (the package
is not even read); writes are atomic (temporary file + rename); a mismatch is an error.
"""
from __future__ import annotations

import argparse
import hashlib
import os
import struct
import sys
import tempfile
import warnings
import zlib
from pathlib import Path

PKG_DATA = Path("/usr/lib/R/site-library/janeaustenr/data")

# Publication order (as janeaustenr::austen_books()).
NOVELS = ["sensesensibility", "prideprejudice", "mansfieldpark", "emma", "northangerabbey",
          "persuasion"]

# sha256 of each output (janeaustenr 1.0.0: Debian 12's r-cran-janeaustenr 1.0.0-1).
PINS = {
    "sensesensibility.txt": "105e1651fe93bed7130078578efd31e0c557d68667ba672ddc876f735b30fe09",
    "prideprejudice.txt": "dfc684d4f857fa938268f9ab9c5567b64bd0691251eca959644adeabe6287a4d",
    "mansfieldpark.txt": "98bc90519cdf4ef663ad7de2734bb529435ef24f7abbde6bb1a50898871dafe9",
    "emma.txt": "7c67b5985c6d0de1efaeb5d342d52cb82c38083c40e2295129e30e87ee690ebe",
    "northangerabbey.txt": "51f91bbe0517db8e65cff009b097ce0a1836124c4e0532ac19e6c0cad982abed",
    "persuasion.txt": "8061549557aebd2fd6e353d18d9197cb707029112bd52d4d8b174583a925848a",
    "all.txt": "887d811d970b962381ef54f0d0dde7d14e7ce7aa2c85fdef0a8a97a47e4390d0",
}


def cache_dir() -> Path:
    if os.environ.get("TWILIGHT_CACHE"):
        return Path(os.environ["TWILIGHT_CACHE"])
    if os.environ.get("XDG_CACHE_HOME"):
        return Path(os.environ["XDG_CACHE_HOME"]) / "twilight"
    return Path(os.environ.get("HOME", ".")) / ".cache" / "twilight"


def sha256_file(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def read_novels() -> dict[str, str]:
    try:
        import rdata  # noqa: PLC0415 (only needed when extracting)
    except ImportError as e:
        sys.exit(f"fetch_data: the Python package rdata is missing ({e}); run scripts/setup.sh")
    rdx, rdb = PKG_DATA / "Rdata.rdx", PKG_DATA / "Rdata.rdb"
    for p in (rdx, rdb):
        if not p.is_file():
            sys.exit(f"fetch_data: {p} not found: install the Debian package r-cran-janeaustenr "
                     "(scripts/setup.sh does)")
    # rdata warns that .rdx is not the usual RDS extension and that a bare blob has no file magic.
    warnings.filterwarnings("ignore", message="(Unknown file type|Wrong extension)",
                            category=UserWarning)
    index = rdata.conversion.convert(rdata.parser.parse_file(rdx))
    variables = {str(k): v for k, v in index["variables"].items()}
    raw = rdb.read_bytes()
    out = {}
    for name in NOVELS:
        if name not in variables:
            sys.exit(f"fetch_data: {rdx} has no variable '{name}' (has: {sorted(variables)})")
        off, n = (int(x) for x in variables[name])
        if off < 0 or n < 5 or off + n > len(raw):
            sys.exit(f"fetch_data: '{name}' at ({off}, {n}) is outside {rdb} ({len(raw)} bytes)")
        blob = raw[off:off + n]
        want = struct.unpack(">I", blob[:4])[0]
        data = zlib.decompress(blob[4:])
        if len(data) != want:
            sys.exit(f"fetch_data: '{name}': {len(data)} bytes decompressed, header says {want}")
        lines = rdata.conversion.convert(rdata.parser.parse_data(data))
        if lines.ndim != 1 or lines.dtype.kind != "U":
            sys.exit(f"fetch_data: '{name}' is not a character vector ({lines.dtype}, "
                     f"{lines.shape})")
        out[name] = "\n".join(str(s) for s in lines).strip("\n") + "\n"
    return out


def write_atomic(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as f:
            f.write(text)
        os.chmod(tmp, 0o644)  # mkstemp's 0600 is for secrets; this is a public text
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--print-hashes", action="store_true",
                    help="print the sha256 of the extracted texts (to update the pins) and exit")
    args = ap.parse_args()
    dst = cache_dir() / "data" / "austen"
    if not args.print_hashes and all((dst / f).is_file() and sha256_file(dst / f) == h
                                     for f, h in PINS.items()):
        print(f"[fetch_data] Austen texts present and verified in {dst}")
        return 0
    novels = read_novels()
    texts = {f"{k}.txt": v for k, v in novels.items()}
    texts["all.txt"] = "\n".join(novels[k] for k in NOVELS)
    hashes = {f: hashlib.sha256(t.encode("utf-8")).hexdigest() for f, t in texts.items()}
    if args.print_hashes:
        for f, h in hashes.items():
            print(f'    "{f}": "{h}",')
        return 0
    bad = [f for f in texts if hashes[f] != PINS[f]]
    if bad:
        sys.exit(f"fetch_data: extracted text differs from the pinned sha256 for {bad} "
                 "(another janeaustenr version?); not writing")
    dst.mkdir(parents=True, exist_ok=True)
    for f, t in texts.items():
        write_atomic(dst / f, t)
    total = sum(len(t) for f, t in texts.items() if f != "all.txt")
    print(f"[fetch_data] wrote {len(texts)} files ({total} characters of novels) to {dst}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
