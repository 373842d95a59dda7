#!/usr/bin/env python3
"""Hit ratio of the memory tier's eviction policies on the bench's read-heavy zipf load.

Replays, through the tier classes themselves (mproxy.backends.tiered.memory), the
load of ``scripts/bench``'s zipf shapes: every key set once (the prefill), then
1 set : 20 gets, keys zipf-distributed (exponent 1.0, rank 0 hottest), values of
32-100 bytes. A set keeps a copy (the proxy wrote it: its TTL is known); a get
that misses keeps one too ("every miss"), or only on the key's second miss
within the ghost filter's memory ("second miss", what the tiered backend does
when keeping a copy costs a remaining-TTL call). Budgets are shares of the
data as the tier counts it (keys, values, per-item overhead): 1/4 = a quarter
of the items fit.

    .venv/bin/python scripts/tier_hit_ratio.py                 # 10,000 keys, 400,000 ops
    .venv/bin/python scripts/tier_hit_ratio.py --keys 100000 --ops 2000000

Prints, per policy, share and fill rule: the hit ratio of the gets, the copies kept
after misses per get (each a remaining-TTL call on Momento), and the backend calls
per operation (misses, fills and sets).
"""

from __future__ import annotations

import argparse
import bisect
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from mproxy.backends.base import Item  # noqa: E402
from mproxy.backends.tiered.memory import LruTier, MemoryTier, entry_size  # noqa: E402

NEVER = float("inf")


def zipf_ranks(keys: int, exponent: float, count: int, rng: random.Random) -> list[int]:
    weights = [1.0 / (i + 1) ** exponent for i in range(keys)]
    total = sum(weights)
    cdf, acc = [], 0.0
    for w in weights:
        acc += w / total
        cdf.append(acc)
    return [min(bisect.bisect_left(cdf, rng.random()), keys - 1) for _ in range(count)]


def replay(tier: MemoryTier, keys: int, ranks: list[int], seed: int, second_miss: bool) -> tuple[float, float, float]:
    rng = random.Random(seed)
    values = [Item(b"v" * rng.randint(32, 100), 0, 1) for _ in range(keys)]
    names = [b"key:%d" % i for i in range(keys)]
    for i in range(keys):
        tier.put(names[i], values[i], NEVER, 1.0)
    gets = hits = fills = sets = 0
    for rank in ranks:
        key = names[rank]
        if rng.randrange(21) == 0:
            sets += 1
            tier.put(key, values[rank], NEVER, 1.0)
            continue
        gets += 1
        if tier.get(key, 1.0) is not None:
            hits += 1
        elif second_miss and not tier.seen(key):
            tier.remember(key)
        else:
            fills += 1
            tier.put(key, values[rank], NEVER, 1.0)
    ops = gets + sets
    calls = (gets - hits) + fills + sets
    return hits / gets, fills / gets, calls / ops


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--keys", type=int, default=10_000)
    p.add_argument("--ops", type=int, default=400_000)
    p.add_argument("--zipf", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=1)
    args = p.parse_args()
    ranks = zipf_ranks(args.keys, args.zipf, args.ops, random.Random(args.seed))
    average = entry_size(b"key:%d" % (args.keys // 2), 66)
    print(f"zipf {args.zipf} over {args.keys} keys, {args.ops} ops (1 set : 20 gets); "
          f"budget = share x {args.keys} items of about {average} bytes")
    print(f"{'policy':<8} {'share':>5} {'fill':<12} {'hit ratio':>9} {'fills/get':>9} {'calls/op':>8}")
    for share in (0.10, 0.25, 0.50):
        budget = int(args.keys * share * average)
        for cls in (LruTier, MemoryTier):
            for second_miss in (False, True):
                tier = cls(budget)
                tier.resize(budget + tier._ghost.nbytes)  # the items' share, the ghost filter on top
                hit, fills, calls = replay(tier, args.keys, ranks, args.seed, second_miss)
                rule = "second miss" if second_miss else "every miss"
                print(f"{cls.policy:<8} {share:>5.2f} {rule:<12} {hit:>9.3f} {fills:>9.3f} {calls:>8.3f}")
    print("calls/op with tiers off: 1.000")
    return 0


if __name__ == "__main__":
    sys.exit(main())
