"""Stand-in training command for tests of run_singlenode.sh's rank-table launcher (no MindSpore).

Prints the launcher's environment; `--fail_rank R` makes rank R exit with code 3 and the
other ranks sleep (the launcher must stop them), `--marker DIR` writes DIR/rank_<R>.done
for each rank that ran to the end.
"""
import argparse
import os
import sys
import time

parser = argparse.ArgumentParser()
parser.add_argument("--fail_rank", type=int, default=-1)
parser.add_argument("--marker", default="")
args = parser.parse_args()

rank = int(os.environ["RANK_ID"])
print(f"RANK_ID={rank} DEVICE_ID={os.environ['DEVICE_ID']} RANK_SIZE={os.environ['RANK_SIZE']} "
      f"RANK_TABLE_FILE={os.environ['RANK_TABLE_FILE']}", flush=True)
if args.fail_rank >= 0:
    if rank == args.fail_rank:
        print("failing on purpose", flush=True)
        sys.exit(3)
    time.sleep(60)
if args.marker:
    with open(os.path.join(args.marker, f"rank_{rank}.done"), "w", encoding="utf-8") as out:
        out.write("ok\n")
