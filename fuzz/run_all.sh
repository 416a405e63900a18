#!/bin/sh
# Run every atheris harness for SECONDS each (default 30), one after another;
# new inputs go to CORPUS/<target> (default /tmp/lazypaged-fuzz), the seeds in
# fuzz/seeds/ are read only. Prints each harness's final stats.
#   fuzz/run_all.sh            # 30 s each
#   SECONDS_EACH=3600 fuzz/run_all.sh   # the long run
set -eu
here=$(cd "$(dirname "$0")" && pwd)
py=${PYTHON:-$here/../.venv/bin/python}
each=${SECONDS_EACH:-30}
corpus=${CORPUS:-/tmp/lazypaged-fuzz}
for t in handoff firecracker criu_images criu_records peer_server peer_client snapshot; do
    mkdir -p "$corpus/$t" "$corpus/crashes"
    echo "== $t"
    (cd "$here" && "$py" "fuzz_$t.py" -max_total_time="$each" -print_final_stats=1 \
        -artifact_prefix="$corpus/crashes/$t-" "$corpus/$t" "seeds/$t") 2>&1 \
        | grep -E "stat::number_of_executed_units|stat::new_units_added|ERROR|Uncaught|Traceback|== " || true
done
