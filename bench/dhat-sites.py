#!/usr/bin/env python3
"""Allocations per request from a DHAT profile, and the sites that make the most.

  bench/dhat-sites.py DHAT_JSON REQUESTS [SITES]

A site is a call stack cut to its first frames outside the allocator and the standard
library (so `String::clone` called from the handler is named by the handler's line).
"""

import collections
import json
import re
import sys

# Frames that say how memory was allocated, not who wanted it.
PLUMBING = re.compile(
    r"^(UnknownInlinedFun|alloc|alloc_impl.*|allocate|.*grow.*|.*reserve.*|with_capacity.*|"
    r"try_allocate_in|new|exchange_malloc|box_new|from|clone|to_vec.*|to_owned|into|push|insert)$"
)


def frames(pp, table):
    out = []
    for i in pp["fs"]:
        m = re.match(r"0x[0-9A-Fa-f]+: (.*) \((.*)\)$", table[i])
        if not m:
            continue
        name, loc = m.groups()
        if loc.startswith("library/") or "vgpreload" in loc or name.startswith("malloc"):
            continue
        if PLUMBING.match(name.split("<")[0]):
            continue
        out.append("%s@%s" % (re.sub(r"<.*>", "", name)[-50:], loc.split("/")[-1]))
    return out


def main():
    profile = json.load(open(sys.argv[1]))
    requests = int(sys.argv[2])
    shown = int(sys.argv[3]) if len(sys.argv) > 3 else 25
    table = profile["ftbl"]
    total = sum(pp["tbk"] for pp in profile["pps"])
    print("allocations per request: %.1f" % (total / requests))
    sites = collections.Counter()
    for pp in profile["pps"]:
        sites[" | ".join(frames(pp, table)[:4])] += pp["tbk"]
    for site, count in sites.most_common(shown):
        print("%6.2f  %s" % (count / requests, site[:300]))


if __name__ == "__main__":
    main()
