#!/bin/bash
# Data-parallel training on the devices of one machine: one process per device.
#
#   bash run_singlenode.sh "<command>" HCCL_JSON_PATH "[START_ID,END_ID)" CARD_COUNT
#
# Ascend (/dev/davinci0 exists): the command starts once per device in the background with
#   RANK_TABLE_FILE, DEVICE_ID, RANK_ID and RANK_SIZE exported; each rank writes
#   $RUN_LOG_DIR/rank_<RANK_ID>/mindformer.log (default ./output/log). The script waits for
#   all ranks, stops the others when one fails, and exits non-zero if any failed.
# No Ascend device: the same command runs CARD_COUNT times on CPU through MindSpore's msrun
#   (`python -m mindspore.parallel.cluster.run`), which sets RANK_ID/RANK_SIZE and the
#   process group; logs go to $RUN_LOG_DIR/worker_<N>.log (default ./output/msrun_log). The
#   rank table file is not needed there. The command must start with python (a path to a
#   python works too: its folder is put first on PATH, as msrun's workers run `python`).
#
# Environment: RUN_LOG_DIR (log folder), MASTER_PORT (msrun's port; default a free one),
#   CLUSTER_TIME_OUT (msrun, seconds, default 600), SINGLENODE_LAUNCHER=auto|rank_table|msrun
#   (default auto: rank_table where /dev/davinci0 exists, else msrun).

usage() {
  cat >&2 <<'EOF'
Usage: bash run_singlenode.sh "<command>" HCCL_JSON_PATH "[START_ID,END_ID)" CARD_COUNT

  <command>          the training command, quoted, e.g.
                     "python run_visualglm_finetune.py --config run_visualglm_lora.yaml"
  HCCL_JSON_PATH     rank table from tools/hccl_tools.py --device_num "[START_ID,END_ID)"
                     (needed on Ascend; not used on CPU)
  [START_ID,END_ID)  device range, END_ID exclusive: "[0,8)" is devices 0..7
  CARD_COUNT         number of devices, END_ID - START_ID; the YAML's
                     parallel_config.data_parallel must be the same number

Example: bash run_singlenode.sh "python train.py --config lora.yaml" \
           ./hccl_8p_01234567_10.0.0.1.json "[0,8)" 8
EOF
}

usage_error() {
  echo "error: $1" >&2
  usage
  exit 2
}

if [ $# -ne 4 ]; then
  usage_error "expected 4 arguments, got $#"
fi

EXECUTE_ORDER=$1
RANK_TABLE_ARG=$2
DEVICE_RANGE_ARG=$3
CARD_COUNT=$4

if [[ -z "${EXECUTE_ORDER//[[:space:]]/}" ]]; then
  usage_error "the command (first argument) is empty"
fi

DEVICE_RANGE=${DEVICE_RANGE_ARG//[[:space:]]/}
RANGE_PATTERN='^\[([0-9]+),([0-9]+)[])]$'  # "]" closes like ")", as in MindFormers' hccl_tools
if [[ ! $DEVICE_RANGE =~ $RANGE_PATTERN ]]; then
  usage_error "device range '$DEVICE_RANGE_ARG' is not of the form [START_ID,END_ID), e.g. [0,8)"
fi
START_DEVICE=$((10#${BASH_REMATCH[1]}))
END_DEVICE=$((10#${BASH_REMATCH[2]}))
if [ "$START_DEVICE" -ge "$END_DEVICE" ]; then
  usage_error "device range '$DEVICE_RANGE_ARG': START_ID must be less than END_ID (END_ID is exclusive)"
fi

if [[ ! $CARD_COUNT =~ ^[0-9]+$ ]]; then
  usage_error "CARD_COUNT '$CARD_COUNT' is not a number"
fi
CARD_COUNT=$((10#$CARD_COUNT))
if [ "$CARD_COUNT" -ne $((END_DEVICE - START_DEVICE)) ]; then
  usage_error "CARD_COUNT is $CARD_COUNT but the range $DEVICE_RANGE_ARG has $((END_DEVICE - START_DEVICE)) devices"
fi

LAUNCHER=${SINGLENODE_LAUNCHER:-auto}
if [ "$LAUNCHER" == "auto" ]; then
  if [ -e /dev/davinci0 ]; then LAUNCHER=rank_table; else LAUNCHER=msrun; fi
fi
if [ "$LAUNCHER" != "rank_table" ] && [ "$LAUNCHER" != "msrun" ]; then
  usage_error "SINGLENODE_LAUNCHER must be auto, rank_table or msrun, not '$SINGLENODE_LAUNCHER'"
fi

ulimit -u unlimited 2>/dev/null

# ---------------------------------------------------------------- Ascend: rank table
run_with_rank_table() {
  if [ ! -f "$RANK_TABLE_ARG" ]; then
    usage_error "rank table file '$RANK_TABLE_ARG' does not exist; make it with: python tools/hccl_tools.py --device_num \"$DEVICE_RANGE\""
  fi
  export RANK_TABLE_FILE
  RANK_TABLE_FILE=$(realpath "$RANK_TABLE_ARG")
  export RANK_SIZE=$CARD_COUNT
  local log_root=${RUN_LOG_DIR:-./output/log}
  local setsid_cmd=()
  if command -v setsid >/dev/null 2>&1; then setsid_cmd=(setsid); fi

  PIDS=()
  local rank device log
  for ((device = START_DEVICE; device < END_DEVICE; device++)); do
    rank=$((device - START_DEVICE))
    log=$log_root/rank_$rank/mindformer.log
    mkdir -p "$log_root/rank_$rank" || exit 1
    # each rank in its own process group (setsid), so that stopping it stops its children too
    DEVICE_ID=$device RANK_ID=$rank "${setsid_cmd[@]}" bash -c "$EXECUTE_ORDER" >"$log" 2>&1 &
    PIDS+=($!)
    echo "start training for rank $rank, device $device (pid $!), log: $log"
  done
  echo "RANK_TABLE_FILE=$RANK_TABLE_FILE RANK_SIZE=$RANK_SIZE; logs in $log_root/rank_*/mindformer.log"

  stop_ranks() {
    local pid
    for pid in "${PIDS[@]}"; do
      if kill -0 "$pid" 2>/dev/null; then
        if [ ${#setsid_cmd[@]} -gt 0 ]; then kill -TERM -- "-$pid" 2>/dev/null; else kill -TERM "$pid" 2>/dev/null; fi
      fi
    done
  }
  trap 'echo "interrupted: stopping all ranks" >&2; stop_ranks; exit 130' INT TERM

  # wait for all ranks; when one fails, stop the others (they would wait for it forever)
  local running=${#PIDS[@]} failed=0 status
  local -A done_ranks=()
  while [ "$running" -gt 0 ]; do
    for rank in "${!PIDS[@]}"; do
      [ -n "${done_ranks[$rank]}" ] && continue
      if ! kill -0 "${PIDS[$rank]}" 2>/dev/null; then
        wait "${PIDS[$rank]}"
        status=$?
        done_ranks[$rank]=$status
        running=$((running - 1))
        if [ "$status" -ne 0 ] && [ "$failed" -ne 0 ]; then
          echo "rank $rank (device $((START_DEVICE + rank))) stopped (exit code $status)" >&2
        elif [ "$status" -ne 0 ]; then
          echo "error: rank $rank (device $((START_DEVICE + rank))) exited with code $status; see $log_root/rank_$rank/mindformer.log" >&2
          if [ "$running" -gt 0 ]; then
            echo "stopping the other ranks" >&2
            stop_ranks
          fi
          failed=1
        fi
      fi
    done
    [ "$running" -gt 0 ] && sleep 1
  done
  trap - INT TERM
  if [ "$failed" -ne 0 ]; then
    echo "training failed; logs in $log_root/rank_*/mindformer.log" >&2
    exit 1
  fi
  echo "all $CARD_COUNT ranks finished; logs in $log_root/rank_*/mindformer.log"
}

# ---------------------------------------------------------------- CPU: msrun
run_with_msrun() {
  local words
  if ! eval "words=($EXECUTE_ORDER)" 2>/dev/null || [ ${#words[@]} -eq 0 ]; then
    usage_error "cannot split the command into words: $EXECUTE_ORDER"
  fi
  local program=${words[0]} name
  name=$(basename "$program")
  if [[ ! $name =~ ^python[0-9.]*$ ]]; then
    usage_error "without an Ascend device the command runs through msrun and must start with python, not '$program'"
  fi
  # msrun's workers run `python ...` (or `python3 ...`) from PATH, and msrun puts `python `
  # before any other program: put this interpreter's folder first on PATH and call it by that name
  local path dir
  if [[ $program == */* ]]; then path=$program; else path=$(command -v "$program"); fi
  if [ -z "$path" ] || [ ! -x "$path" ]; then
    usage_error "'$program' is not an executable python"
  fi
  dir=$(cd "$(dirname "$path")" && pwd)
  if [[ $name != python3 ]] && [ -x "$dir/python" ]; then
    words[0]=python
  elif [ -x "$dir/python3" ]; then
    words[0]=python3
  else
    usage_error "msrun needs 'python' or 'python3' next to '$path' (in $dir)"
  fi
  PATH=$dir:$PATH
  export PATH
  local python=$dir/${words[0]}

  local port=${MASTER_PORT:-}
  if [ -z "$port" ]; then
    port=$("$python" -c 'import socket
s = socket.socket()
s.bind(("127.0.0.1", 0))
print(s.getsockname()[1])') || { echo "error: $python could not pick a free port" >&2; exit 1; }
  fi
  local log_dir=${RUN_LOG_DIR:-./output/msrun_log}
  if [ -n "$RANK_TABLE_ARG" ] && [ ! -f "$RANK_TABLE_ARG" ]; then
    echo "note: no Ascend device; the rank table '$RANK_TABLE_ARG' is not used" >&2
  fi
  echo "no Ascend device: starting $CARD_COUNT CPU processes with msrun ($python -m mindspore.parallel.cluster.run), master port $port"
  echo "logs: $log_dir/worker_<rank>.log and $log_dir/scheduler.log"
  # msrun's own stderr (its notices, and a traceback when a worker fails) is shown only when
  # no worker explains the failure with an "error: ..." line of its own
  local msrun_stderr
  msrun_stderr=$(mktemp)
  "$python" -m mindspore.parallel.cluster.run --worker_num="$CARD_COUNT" --local_worker_num="$CARD_COUNT" \
    --master_port="$port" --log_dir="$log_dir" --join=True --cluster_time_out="${CLUSTER_TIME_OUT:-600}" \
    "${words[@]}" 2>"$msrun_stderr"
  local status=$?
  if [ "$status" -ne 0 ]; then
    local reason
    reason=$(grep -h -m1 '^error: ' "$log_dir"/worker_*.log 2>/dev/null | head -n 1)
    if [ -n "$reason" ]; then
      rm -f "$msrun_stderr"
      echo "error: msrun exited with code $status: ${reason#error: } (logs: $log_dir/worker_*.log)" >&2
      exit 2
    fi
    cat "$msrun_stderr" >&2
    rm -f "$msrun_stderr"
    echo "error: msrun exited with code $status; see $log_dir/worker_*.log" >&2
    exit "$status"
  fi
  rm -f "$msrun_stderr"
  echo "all $CARD_COUNT ranks finished; logs in $log_dir"
}

if [ "$LAUNCHER" == "rank_table" ]; then
  run_with_rank_table
else
  run_with_msrun
fi
