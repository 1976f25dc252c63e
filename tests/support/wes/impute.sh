#!/usr/bin/env bash
# A tiny stand-in for an imputation workflow, run by tests/support/wes/engine.sh inside a real sapporo server.
#
#     bash impute.sh workflow_params.json OUTPUTS_DIR
#
# workflow_params (what imputationd renders from its `workflow_params` template):
#   files     list of input .vcf.gz names (relative to the working directory) or absolute paths, or of CWL File
#             objects ({"class": "File", "location": NAME_OR_PATH}), as a CWL workflow takes them
#   panel, build, job_id   copied into the outputs
#   simulate  "fail": print an error on stderr and exit 3 (sapporo reports EXECUTOR_ERROR)
#   sleep     seconds to wait before working (to cancel a run while it is RUNNING)
#
# For each input it writes chr<N>.dose.vcf.gz (the input's records with IMPUTED added to INFO) and
# chr<N>.info.txt; then stats.txt and "logs/impute log.txt" (a subfolder and a space, to exercise URL quoting).
set -euo pipefail

params=$1
out=$2

param() { jq -r "$1" "${params}"; }

panel=$(param '.panel // ""')
build=$(param '.build // ""')
job_id=$(param '.job_id // ""')
simulate=$(param '.simulate // ""')
sleep_seconds=$(param '.sleep // 0')
mapfile -t files < <(param '.files // [] | .[] | if type == "object" then .location else . end')

echo "imputing ${#files[@]} file(s) with panel=${panel} build=${build}"

if [[ "${simulate}" == "fail" ]]; then
    echo "loading reference panel ${panel}" >&2
    echo "ERROR: reference panel '${panel}' has no chromosome 20 for ${build}" >&2
    exit 3
fi

if [[ "${sleep_seconds}" != "0" ]]; then
    sleep "${sleep_seconds}"
fi

if (( ${#files[@]} == 0 )); then
    echo "ERROR: no input files" >&2
    exit 2
fi

mkdir -p "${out}/logs"
stats="${out}/stats.txt"
{
    echo "job_id: ${job_id}"
    echo "panel: ${panel}"
    echo "build: ${build}"
} >"${stats}"

for f in "${files[@]}"; do
    if [[ ! -f "${f}" ]]; then
        echo "ERROR: input file ${f} not found" >&2
        exit 2
    fi
    gzip -t "${f}"
    chrom=$(zcat "${f}" | awk '!/^#/ && chrom == "" { chrom = $1 } END { print chrom }')
    chrom="chr${chrom#chr}"
    zcat "${f}" \
        | awk 'BEGIN { OFS = "\t" }
               /^##/ { print; next }
               /^#CHROM/ { print "##imputation=imputationd-test-workflow"; print; next }
               { $8 = ($8 == "." ? "IMPUTED" : $8 ";IMPUTED"); print }' \
        | gzip -n >"${out}/${chrom}.dose.vcf.gz"
    variants=$(zcat "${f}" | grep -vc '^#' || true)
    printf 'SNP\tRsq\n' >"${out}/${chrom}.info.txt"
    zcat "${f}" | awk 'BEGIN { OFS = "\t" } !/^#/ { print $1 ":" $2, "0.9" }' >>"${out}/${chrom}.info.txt"
    echo "${f}: ${variants} variants on ${chrom}" >>"${stats}"
done

echo "done at $(date -u +%Y-%m-%dT%H:%M:%SZ)" >"${out}/logs/impute log.txt"
echo "finished"
