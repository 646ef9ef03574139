#!/usr/bin/env python3
"""Replay of Quest's page selection on a real KV dump (`twilight bench --attn-dump`) with page bounds
kept at fewer bits: the attention mass (exact softmax over the whole context, fp32) that the kept pages
hold, per dumped layer, for fp bounds and for 8 / 6 / 4-bit codes made as attention/page_bounds.h makes
its 8-bit ones (one affine step per page and kv head, s = (max - min) / levels, codes rounded outwards).
A pre-check for a cheaper level 1 (fewer bound bytes for the select to read), not the engine's code:
the float query is used as is (the engine's int8 query changes little, docs/ACCURACY.md).

    ~/.cache/twilight/venv/bin/python3 scripts/quest_bounds_replay.py build-dumps/qwen15b-emma-8192.kv

Group mode (the GPU step's): a page's score for a kv head is the max over its G query heads, the mass
the mean over them. --head: each query head selects its own pages (the CPU's gqa=head).
Keeps ceil(frac * n / 16) pages (at least 2), the first and last always, the rest by descending score.

--adaptive: a data-sized level 1 against the fixed B0 (TWILIGHT.md section 4, item 4), 8-bit bounds,
group mode, every dumped layer, kv head and query step. The same page order; a page's bound mass is
n_p exp(u_p - max u) normalised over the pages, u_p its Quest bound on the score q.k / sqrt(d) per query
head, averaged over the group; the adaptive rule keeps pages in that order until their bound mass reaches
p0. Prints, per rule, the share of pages kept and the attention mass they hold (mean, 10th percentile,
minimum over the lists).
"""
import argparse
import struct

import numpy as np

P = 16  # tokens per page


def read_dump(path):
    with open(path, 'rb') as fh:
        f = fh.read()
    if f[:8] != b'TWKVDUMP':
        raise SystemExit(f'{path}: not a twilight KV dump')
    o = 12  # magic, version
    o += 16  # arch
    name = f[o:o + 64].rstrip(b'\0').decode(); o += 64
    _, H, Hkv, d = struct.unpack_from('<4I', f, o); o += 16
    nt, qp0 = struct.unpack_from('<2Q', f, o); o += 16
    ns, nd = struct.unpack_from('<2I', f, o); o += 8
    layers = struct.unpack_from(f'<{nd}I', f, o); o += 4 * nd
    dl, = struct.unpack_from('<I', f, o); o += 4 + dl
    K = []
    for _ in range(nd):
        K.append(np.frombuffer(f, np.float16, nt * Hkv * d, o).reshape(nt, Hkv, d).astype(np.float32))
        o += 2 * nt * Hkv * d * 2  # K, then V (not needed)
    Q = np.frombuffer(f, np.float32, ns * nd * H * d, o).reshape(ns, nd, H, d)
    return name, layers, H, Hkv, d, qp0, K, Q


def page_bounds(k, n, levels):
    pages = [k[p:min(n, p + P)] for p in range(0, n, P)]  # the last page may be partial
    mn, mx = np.stack([x.min(0) for x in pages]), np.stack([x.max(0) for x in pages])
    if not levels:
        return mn, mx
    lo, hi = mn.min(1, keepdims=True), mx.max(1, keepdims=True)
    s = np.where(hi > lo, (hi - lo) / levels, 1.0)
    a = np.clip(np.floor((mn - lo) / s), 0, levels)
    b = np.clip(np.ceil((mx - lo) / s), 0, levels)
    return lo + s * a, lo + s * b


def weights_and_bounds(k, q, n, levels):
    """The exact attention weights of the G query heads q over the first n keys, [G][n], and each
    page's Quest bound on their scores q.k / sqrt(d), [G][pages]."""
    d = k.shape[1]
    sc = (q @ k[:n].T) / np.sqrt(d)
    w = np.exp(sc - sc.max(1, keepdims=True))
    w /= w.sum(1, keepdims=True)
    mn, mx = page_bounds(k, n, levels)
    u = np.maximum(q[:, None, :] * mx[None], q[:, None, :] * mn[None]).sum(2) / np.sqrt(d)
    return w, u


def page_order(r):
    """Quest's page order for page scores r: the first and last pages, then by descending score."""
    npg = len(r)
    return np.concatenate([[0, npg - 1], np.argsort(-r[1:npg - 1], kind='stable') + 1])


def kept_mass(k, q, n, levels, frac, head_mode):
    npg = (n + P - 1) // P
    w, u = weights_and_bounds(k, q, n, levels)
    rank = u if head_mode else u.max(0, keepdims=True)
    keep = max(2, int(np.ceil(frac * n / P)))
    masses = []
    for g in range(q.shape[0]):
        sel = page_order(rank[g if head_mode else 0])[:keep]
        tok = np.zeros(npg * P, bool)
        for p in sel:
            tok[p * P:(p + 1) * P] = True
        masses.append(w[g, tok[:n]].sum())
    return float(np.mean(masses))


def adaptive(name, layers, H, Hkv, d, n0, K, Q, fracs):
    G = H // Hkv
    kept = []  # per list: cumulative true mass and bound mass in the page order, and its page count
    for li in range(len(layers)):
        for h in range(Hkv):
            k = K[li][:, h]
            for st in range(Q.shape[0]):  # query step st sees the context plus the st tokens before it
                n = n0 + st
                npg = (n + P - 1) // P
                w, u = weights_and_bounds(k, Q[st, li, h * G:(h + 1) * G], n, 255)
                order = page_order(u.max(0))
                page_mass = np.add.reduceat(w.mean(0), np.arange(0, n, P))
                cnt = np.minimum(P, n - np.arange(npg) * P)
                beta = cnt[None] * np.exp(u - u.max(1, keepdims=True))
                beta = (beta / beta.sum(1, keepdims=True)).mean(0)
                kept.append((np.cumsum(page_mass[order]), np.cumsum(beta[order]), npg))
    print(f'{name}: layers {layers[0]}..{layers[-1]} ({len(layers)}), H {H}, Hkv {Hkv}, d {d}, context {n0}, '
          f'{Q.shape[0]} query steps: {len(kept)} lists; 8-bit bounds, group mode')
    print('| level 1 | pages kept (mean) | mass kept: mean | 10th pct | min |')
    print('| --- | ---: | ---: | ---: | ---: |')

    def row(label, ks):
        m = np.array([ct[k - 1] for (ct, _, _), k in zip(kept, ks)])
        share = np.mean([k / npg for (_, _, npg), k in zip(kept, ks)])
        print(f'| {label} | {100 * share:.1f}% | {m.mean():.3f} | {np.percentile(m, 10):.3f} | {m.min():.3f} |')

    for f in fracs:
        row(f'fixed B0 = n x {f:g}', [max(2, int(np.ceil(f * npg))) for _, _, npg in kept])
    for p0 in (0.9, 0.95, 0.98, 0.99, 0.995, 0.998):
        row(f'bound mass {p0:g}', [max(2, min(npg, int(np.searchsorted(cb, p0)) + 1)) for _, cb, npg in kept])


def main():
    ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    ap.add_argument('dump')
    ap.add_argument('--head', action='store_true', help='per-query-head selection (default: group mode)')
    ap.add_argument('--fracs', default='0.125,0.25', help='B0 as fractions of the context')
    ap.add_argument('--adaptive', action='store_true', help='bound-mass level 1 against fixed B0 (see above)')
    args = ap.parse_args()
    name, layers, H, Hkv, d, qp0, K, Q = read_dump(args.dump)
    G, n = H // Hkv, qp0 + 1
    if args.adaptive:
        return adaptive(name, layers, H, Hkv, d, n, K, Q, [float(x) for x in args.fracs.split(',')])
    print(f'{name}: layers {layers}, H {H}, Hkv {Hkv}, d {d}, context {n}, {"head" if args.head else "group"} mode')
    kinds = [(0, 'fp'), (255, '8-bit'), (63, '6-bit'), (15, '4-bit')]
    print('| B0 | layer | ' + ' | '.join(k for _, k in kinds) + ' |')
    print('| --- | --- |' + ' ---: |' * len(kinds))
    for frac in (float(x) for x in args.fracs.split(',')):
        for li, layer in enumerate(layers):
            m = [np.mean([kept_mass(K[li][:, h], Q[0, li, h * G:(h + 1) * G], n, lv, frac, args.head)
                          for h in range(Hkv)]) for lv, _ in kinds]
            print(f'| n x {frac:g} | {layer} | ' + ' | '.join(f'{x:.3f}' for x in m) + ' |')


if __name__ == '__main__':
    main()
