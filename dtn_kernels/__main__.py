"""``python -m dtn_kernels``: what this installation will run (see dtn_kernels.env)."""
import argparse
import json

from .env import format_report, report

ap = argparse.ArgumentParser(prog="python -m dtn_kernels", description="versions, extension, device and kernels")
ap.add_argument("--device", help="cpu or cuda (default: cuda when available)")
ap.add_argument("--json", action="store_true", help="print JSON")
args = ap.parse_args()
info = report(args.device)
print(json.dumps(info, indent=2) if args.json else format_report(info))
