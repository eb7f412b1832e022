#!/usr/bin/env python3
"""Fail if a hot loop of an instantiated CPU kernel variant stops vectorising.

    check_vectorised.py [--objdump objdump] OBJECT

OBJECT is csrc/tests/vectorised_kernels.cpp compiled as the extension is
(-O3, no -march): the avx512 / avx2 / default instantiations of the
discrepancy forward and backward and of the PGD step, for float.  For each
function the script disassembles it and finds its tight hot loops: a backward
jump whose range holds the loop's mark and at most one other jump, which
leaves the range, i.e. a loop body without branches inside, as the vectorised
loops over the classes of a row (discrepancy; mark: an exp, the `pslld $0x17`
that builds 2^n) and over the pixels of a row (PGD step; mark: the packed
`minps` of the clamp) are.  Each such loop must have

* packed arithmetic of the variant's register width: a `vfmadd...ps` on zmm
  (avx512) or ymm (avx2), `mulps` on xmm (default, SSE2 has no FMA);
* no scalar float arithmetic or compares (`...ss`, `comiss`), which is how GCC
  lowers a vector operation it cannot do in registers (lane by lane);
* no calls (a helper that was not inlined, or a libm/memcpy call per vector);

and each function must have at least as many such loops as its source has
full-vector hot loops (FUNCTIONS).  A loop that GCC lowers lane by lane gets branches or scalar ops in
its body and fails one of the two.  Pure text checks of objdump output: no
timing, no callgrind, so the result does not depend on the machine's load or
on the CPU it runs on (the object is only disassembled, never run).
Registered with ctest as `vectorised_kernels` (CMakeLists.txt).
"""
import argparse
import re
import subprocess
import sys

# function name fragment -> (variant, mark of its hot loops, number of full-vector hot loops
# in the source).  forward, for each of reverse = false / true: C <= 16: the current-row tile
# loop and the snapshot chunk loop; C > 16: the current-row loop and the snapshot chunk loop;
# reverse adds the p_t loop in both (4 + 6 = 10).  backward, for each reverse: the current-row
# loop and the snapshot chunk loop (2 + 2 = 4).  PGD step: the loop over a row's pixels (1).
# GCC may add copies.
FUNCTIONS = {
    "forward_avx512<float, float>": ("avx512", "exp", 10),
    "forward_avx2<float, float>": ("avx2", "exp", 10),
    "forward_default<float, float>": ("default", "exp", 10),
    "backward_avx512<float, float>": ("avx512", "exp", 4),
    "backward_avx2<float, float>": ("avx2", "exp", 4),
    "backward_default<float, float>": ("default", "exp", 4),
    "pgd_avx512<float, float>": ("avx512", "min", 1),
    "pgd_avx2<float, float>": ("avx2", "min", 1),
    "pgd_default<float, float>": ("default", "min", 1),
}
PACKED = {
    "avx512": re.compile(r"^vf(n?m(add|sub))\d+ps\b.*%zmm"),
    "avx2": re.compile(r"^vf(n?m(add|sub))\d+ps\b.*%ymm"),
    "default": re.compile(r"^mulps\b.*%xmm"),
}
SCALAR_FP = re.compile(r"^v?(add|sub|mul|div|max|min|sqrt|u?comi|cmp\w*|f\w*)ss\b")
MARKS = {"exp": re.compile(r"^v?pslld\s+\$0x17,"), "min": re.compile(r"^v?minps\b")}
INSN = re.compile(r"^\s*([0-9a-f]+):\s+(\S.*)$")
HEADER = re.compile(r"^[0-9a-f]+ <(.*)>:$")


def functions(objdump, path):
    text = subprocess.run([objdump, "-d", "-C", "--no-show-raw-insn", path], check=True,
                          capture_output=True, text=True).stdout
    funcs, name = {}, None
    for line in text.splitlines():
        m = HEADER.match(line)
        if m:
            name = m.group(1)
            funcs[name] = []
            continue
        m = INSN.match(line)
        if m and name is not None:
            funcs[name].append((int(m.group(1), 16), " ".join(m.group(2).split())))
    return funcs


JUMP = re.compile(r"^(j\w*)\s+([0-9a-f]+)\b")


def tight_loops(insns, mark):
    """Bodies of the loops with the mark and no branch inside (see the docstring)."""
    addrs = {a for a, _ in insns}
    jumps = [(a, int(m.group(2), 16)) for a, t in insns for m in [JUMP.match(t)] if m]
    loops = []
    for addr, target in jumps:
        if not (target <= addr and target in addrs):
            continue
        inside = [(a, t) for a, t in jumps if target <= a < addr]
        if len(inside) > 1 or any(target < t <= addr for _, t in inside):
            continue  # a branch inside the body
        body = [t for a, t in insns if target <= a <= addr]
        if any(mark.match(t) for t in body):
            loops.append((target, addr, body))
    return loops


def check_loop(body, variant):
    problems = []
    if not any(PACKED[variant].match(t) for t in body):
        problems.append("no packed %s arithmetic" % variant)
    scalar = [t for t in body if SCALAR_FP.match(t)]
    if scalar:
        problems.append("scalar float ops: " + "; ".join(scalar[:4]))
    calls = [t for t in body if t.startswith("call")]
    if calls:
        problems.append("calls: " + "; ".join(calls[:4]))
    if variant != "avx512" and any("%zmm" in t for t in body):
        problems.append("zmm registers")
    return problems


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--objdump", default="objdump")
    ap.add_argument("object")
    args = ap.parse_args()
    funcs = functions(args.objdump, args.object)
    failures = 0
    for fragment, (variant, mark, min_loops) in FUNCTIONS.items():
        matches = [n for n in funcs if fragment in n and "::detail::" in n and not n.endswith("@plt")]
        if len(matches) != 1:
            print("FAIL %s: %d functions match in %s" % (fragment, len(matches), args.object))
            failures += 1
            continue
        loops = tight_loops(funcs[matches[0]], MARKS[mark])
        bad = [(s, e, p) for s, e, body in loops for p in [check_loop(body, variant)] if p]
        ok = len(loops) >= min_loops and not bad
        print("%s %s: %d branch-free %s loops (need >= %d), %s" % (
            "ok  " if ok else "FAIL", fragment, len(loops), mark, min_loops,
            "all packed" if not bad else "%d not packed" % len(bad)))
        for s, e, p in bad:
            print("     loop %x-%x: %s" % (s, e, ", ".join(p)))
        failures += not ok
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
