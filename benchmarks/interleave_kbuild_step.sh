#!/bin/sh
# The blocks-only Kbuild step (analysis kept) of another revision, of this
# checkout and llvm-bolt-22, in turns, on one kernel and profile: wall time and
# peak RSS (GNU time: the largest process, a forked child included).
#
#   benchmarks/interleave_kbuild_step.sh BASE_REV VMLINUX PROFILE.kbb [TURNS]
#   (paths without spaces)
#
# Turns, not one tool after the other: this machine's speed drifts by more than
# the differences measured; each run starts once the last one's output is
# written back (sync). At the end, per tool: best and median time, peak, and
# the median ratio to llvm-bolt-22's time in the same turn. The
# base revision runs from a temporary git worktree with the same Python
# environment (as same_outputs.py does).
set -eu
root=$(cd "$(dirname "$0")/.." && pwd)
rev=$1 vmlinux=$(realpath "$2") profile=$(realpath "$3") turns=${4:-3}
py=$root/.venv/bin/python
work=$(mktemp -d)
trap 'git -C "$root" worktree remove --force "$work/base" >/dev/null 2>&1; rm -rf "$work"' EXIT
git -C "$root" worktree add --detach "$work/base" "$rev" >/dev/null 2>&1
"$root/.venv/bin/kbuild-bolt" profile convert "$profile" --vmlinux "$vmlinux" --to fdata \
    -o "$work/profile.fdata" >/dev/null
# (revisions before the profile named its build cannot read that line)
grep -v '^build-id ' "$profile" > "$work/base.kbb"
cd "$work"     # (python -m puts the working directory first on the path)
timed() {   # label command...: one line, "label seconds KB"
    label=$1; shift
    sync    # (each run starts with the last one's output written back)
    /usr/bin/time -f "$label %e s %M KB" -o "$work/time" "$@" >/dev/null 2>&1
    tee -a "$work/all" < "$work/time"
}
rewrite() {   # tree-label source-dir profile (a command line, for time to run)
    echo env PYTHONPATH="$2" "$py" -m kbuild_bolt rewrite "$vmlinux" -o "$work/out" \
        --profile "$3" --reorder-blocks=ext-tsp --cache-dir "$work/cache-$1" -q
}
"$py" -m compileall -q "$work/base/kbuild_bolt" "$root/kbuild_bolt"
$(rewrite base "$work/base" "$work/base.kbb") >/dev/null   # (the first run keeps the analysis)
$(rewrite now "$root" "$profile") >/dev/null
for _ in $(seq "$turns"); do
    timed base $(rewrite base "$work/base" "$work/base.kbb")
    timed now $(rewrite now "$root" "$profile")
    timed llvm-bolt-22 llvm-bolt-22 "$vmlinux" -o "$work/bolt.out" -data="$work/profile.fdata" \
        -reorder-blocks=ext-tsp -eliminate-unreachable=0 -simplify-conditional-tail-calls=0
done
# Per tool: the best and the median time, the largest peak, and the median of
# its time over llvm-bolt-22's in the same turn (the machine's speed drifts
# from turn to turn more than within one).
"$py" - "$work/all" <<'EOF'
import statistics
import sys
runs = {}
for line in open(sys.argv[1]):
    label, seconds, _, kb, _ = line.split()
    runs.setdefault(label, []).append((float(seconds), int(kb)))
bolt = [t for t, _ in runs["llvm-bolt-22"]]
for label, got in runs.items():
    times = [t for t, _ in got]
    ratio = statistics.median(t / b for t, b in zip(times, bolt))
    print(f"{label}: best {min(times):.2f} s, median {statistics.median(times):.2f} s, "
          f"peak {max(kb for _, kb in got) / 1024:.0f} MB ({len(got)} runs), "
          f"{ratio:.2f}x llvm-bolt-22 in the same turn (median)")
EOF
