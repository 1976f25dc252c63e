# The "shell" workflow engine for imputationd's test sapporo.
#
# tests/support/wes/sapporo_server.py writes this file in front of the run.sh that ships with the installed sapporo
# and passes the result as `--run-sh`. The stock run.sh calls `run_${workflow_engine}` and owns everything
# else (state.txt, exit_code.txt, the cancel and signal traps, `sapporo-cli dump-outputs` for outputs.json),
# so this file adds one engine and changes nothing of sapporo's run contract.
#
# The engine runs the workflow script (`workflow_url`: an absolute path on the server, or the name of a
# workflow attachment) with bash, in the run's exe/ directory where the attachments are:
#     bash WORKFLOW workflow_params.json OUTPUTS_DIR
# Its stdout and stderr become the RunLog's stdout/stderr; a non-zero exit is EXECUTOR_ERROR.

function run_shell() {
    local wf_path="${wf_url}"
    if [[ "${wf_path}" == file://* ]]; then
        wf_path="${wf_path#file://}"
    elif [[ "${wf_path}" != /* ]]; then
        wf_path="${exe_dir}/${wf_path}"
    fi
    cd "${exe_dir}"
    local -a cmd_arr=(bash "${wf_path}" "${wf_params}" "${outputs_dir}")
    _write_and_run cmd_arr
}
