#!/usr/bin/env bash
# Fill ./.whl (git-ignored) with the wheels that benchmarks/gpu_check.sh installs on the GPU machine,
# which reaches no network: exactly the packages xcit-ssl needs that the machine's image lacks (the
# image's list: benchmarks/gpu_check/image_packages.txt), and their own needs that it lacks too
# (each wheel's Requires-Dist checked against that list). One pinned version each: the versions
# the test suite passes with in .venv (`.venv/bin/pip freeze`). The only network step of the check;
# run here, never on the GPU machine. Safe to run again (pip skips files already in .whl).
#
#   bash scripts/fetch_wheels.sh            # fetch what is missing
#   bash scripts/fetch_wheels.sh --list     # print the pinned list and exit
set -euo pipefail
cd "$(dirname "$0")/.."

# name==version  kind  why the image lacks it
WHEELS=(
  "faiss-cpu==1.15.1         binary  k-NN search (xcit_ssl.evaluation.knn)"
  "torchdata==0.11.0         pure    StatefulDataLoader (xcit_ssl.data.resumable)"
  "jsonargparse==4.53.0      pure    every command's parser, LightningCLI"
  "docstring-parser==0.18.0  pure    jsonargparse[signatures]"
  "typeshed-client==2.15.0   pure    jsonargparse[signatures]"
  "webdataset==1.0.2         pure    --data.dataset webdataset"
  "braceexpand==0.1.7        pure    webdataset"
  "litdata==0.2.76           pure    --data.dataset litdata"
  "obstore==0.12.1           binary  litdata"
  "boto3==1.44.18            pure    litdata"
  "botocore==1.44.18         pure    boto3, s3transfer"
  "s3transfer==0.19.3        pure    boto3"
  "jmespath==1.1.0           pure    boto3, botocore"
)
# Binary wheels: for the GPU machine's python3 (3.12) and for the CPU rehearsal's (3.11), at the
# same version. faiss-cpu and obstore publish abi3 wheels (cp310-abi3, cp311-abi3): one file serves
# both, and pip keeps it once. gpu_check.sh installs only the wheels the running python3 accepts.
PYTHONS=(3.12 3.11)
PLATFORMS=(manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 manylinux_2_17_x86_64
           manylinux2014_x86_64 manylinux1_x86_64 manylinux_2_31_x86_64 manylinux_2_34_x86_64 manylinux_2_35_x86_64)

if [ "${1:-}" = "--list" ]; then
  printf '%s\n' "${WHEELS[@]}"
  exit 0
fi

mkdir -p .whl
platform_flags=()
for p in "${PLATFORMS[@]}"; do platform_flags+=(--platform "$p"); done
# the registry only: no find-links folder or local index of this machine, no constraints file
export PIP_CONFIG_FILE=/dev/null PIP_DISABLE_PIP_VERSION_CHECK=1
for line in "${WHEELS[@]}"; do
  read -r spec kind _ <<<"$line"
  if [ "$kind" = binary ]; then pythons=("${PYTHONS[@]}"); else pythons=("${PYTHONS[0]}"); fi
  for py in "${pythons[@]}"; do
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version "$py" --implementation cp \
      "${platform_flags[@]}" -d .whl "$spec"
  done
done
# one version of each project: two would stop the install on the GPU machine
python3 - <<'PYEOF'
import collections, pathlib, re, sys
wanted = {}
for line in open("scripts/fetch_wheels.sh"):
    m = re.match(r'\s*"([A-Za-z0-9_.-]+)==([^ ]+)\s', line)
    if m:
        wanted[re.sub(r"[-_.]+", "_", m.group(1)).lower()] = m.group(2)
seen = collections.defaultdict(set)
for whl in pathlib.Path(".whl").glob("*.whl"):
    name, version = whl.name.split("-")[:2]
    seen[re.sub(r"[-_.]+", "_", name).lower()].add(version)
bad = {n: v for n, v in seen.items() if n not in wanted or v != {wanted[n]}}
missing = sorted(set(wanted) - set(seen))
if bad or missing:
    sys.exit(f"fetch_wheels: .whl holds other versions or projects {bad} or misses {missing}; empty .whl and rerun")
PYEOF
du -sh .whl
ls .whl
