#!/usr/bin/env bash
# What a CI job on a pull request runs (see .github/workflows/pipeline.yml and the README, "Share results and CI"):
#   1. check the default DVC remote is reachable (one-line error otherwise; nothing pulled or changed);
#   2. pull what exists: outputs and the run-cache, so that unchanged stages are restored, not rerun;
#   3. dvc repro: only the stages whose code, params or inputs changed run;
#   4. push the new outputs and run-cache (a push that was interrupted is finished by the next one);
#   5. write a Markdown report: the stages that ran, `dvc params diff` and `dvc metrics diff` against the base
#      revision, and the plots that changed (rendered by `dvc plots diff` into a folder beside the report).
#
# usage: ci/repro.sh [--base REV] [--report FILE] [--strict] [--no-push]
#   --base    revision to compare with (default: $CI_BASE_REV, else HEAD, i.e. the workspace against its commit)
#   --report  Markdown report to write (default: ci-report.md); the plots go to <report>-plots/
#   --strict  fail (exit 3) when the remote lacks outputs of dvc.lock, instead of rebuilding them
#   --no-push do not push (a fork's pull request has no write access)
set -euo pipefail
base="${CI_BASE_REV:-HEAD}" report="ci-report.md" strict="" push=1
while [ $# -gt 0 ]; do
  case "$1" in
    --base) base="$2"; shift 2 ;;
    --report) report="$2"; shift 2 ;;
    --strict) strict="--strict"; shift ;;
    --no-push) push=0; shift ;;
    -h|--help) sed -n '2,15p' "$0"; exit 0 ;;
    *) echo "error: unknown option $1 (see ci/repro.sh --help)" >&2; exit 64 ;;
  esac
done
here="$(cd "$(dirname "$0")" && pwd)"
py="${PYTHON:-python}"
log="$(mktemp -d)"
trap 'rm -rf "$log"' EXIT
t0=$(date +%s)

"$py" "$here/remote.py" check
run_cache="--run-cache"
case "$(dvc remote list | awk -v d="$(dvc remote default 2>/dev/null)" '$1==d {print $2}')" in
  http://*|https://*) run_cache="" ;;  # DVC keeps no run-cache over HTTP
esac
dvc pull $run_cache --allow-missing >"$log/pull" 2>&1 || { tail -n 20 "$log/pull" >&2; echo "error: dvc pull failed" >&2; exit 2; }
"$py" "$here/remote.py" missing $strict

dvc repro 2>&1 | tee "$log/repro"
ran=$(sed -n "s/^Running stage '\([^']*\)'.*/\1/p" "$log/repro")
if [ "$push" = 1 ]; then
  dvc push $run_cache >"$log/push" 2>&1 || { tail -n 20 "$log/push" >&2; echo "error: dvc push to the default remote failed; rerun ci/repro.sh to finish it (pushed objects are kept)" >&2; exit 4; }
fi

plots="${report%.md}-plots"
{
  echo "## Pipeline report"
  echo
  echo "Compared with \`$base\`; $(($(date +%s) - t0)) s."
  echo
  if [ -n "$ran" ]; then
    echo "**Stages run ($(echo "$ran" | wc -l)):** $(echo "$ran" | sed 's/.*/`&`/' | paste -sd, - | sed 's/,/, /g')"
  else
    echo "**Stages run:** none (every stage up to date or restored from the run-cache)"
  fi
  echo
  echo "### Params changed"
  echo
  params=$(dvc params diff "$base" --md 2>/dev/null || true)
  [ "$(echo "$params" | grep -c '^|')" -gt 2 ] && echo "$params" || echo "No params changed."
  echo
  echo "### Metrics changed"
  echo
  metrics=$(dvc metrics diff "$base" --md 2>/dev/null || true)
  [ "$(echo "$metrics" | grep -c '^|')" -gt 2 ] && echo "$metrics" || echo "No metrics changed."
  echo
  echo "### Plots changed"
  echo
  changed=$(git diff --name-only "$base" -- metrics/plots 2>/dev/null; git ls-files --others --exclude-standard metrics/plots)
  if [ -n "$changed" ] && dvc plots diff "$base" -o "$plots" >/dev/null 2>&1; then
    echo "$changed" | sort -u | sed 's/.*/- `&`/'
    echo
    echo "Rendered old against new: \`$plots/index.html\`."
  else
    echo "No plots changed."
  fi
} >"$report"
echo "report: $report"
