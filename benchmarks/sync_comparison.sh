#!/usr/bin/env bash
# Copy a comparison's record (protocol, folds, finished cells, report) between runs/ and docs/.
#   bash benchmarks/sync_comparison.sh save     runs/compare/X -> docs/comparison/X (commit it)
#   bash benchmarks/sync_comparison.sh restore  docs/comparison/X -> runs/compare/X (to resume)
# Weights and masks stay in runs/: they are derived from third-party scans.
set -euo pipefail
name=${2:-BrainMaskT1}
runs=runs/compare/$name docs=docs/comparison/$name
case ${1:-} in
    save) src=$runs dst=$docs ;;
    restore) src=$docs dst=$runs ;;
    *) echo "usage: $0 save|restore [NAME]" >&2; exit 2 ;;
esac
mkdir -p "$dst/cells"
for file in protocol.json folds.json ranking.json ranking.md cases.csv ranking.png slices.png; do
    if [ -f "$src/$file" ]; then cp "$src/$file" "$dst/"; fi
done
# finished cells only: a writer's temporary files start with a dot
cells=$(cd "$dst/cells" && pwd)
(cd "$src/cells" && find . -name '*.json' ! -name '.*' -exec cp --parents -t "$cells" {} +)
echo "$(find "$dst/cells" -name '*.json' | wc -l) cells in $dst"
