"""``nsf studio``: the browser app (:mod:`nsf.studio`; needs the ``studio`` extra: gradio)."""

from __future__ import annotations

import argparse
from typing import Any


def add_parser(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "studio", help="a browser app: drop a content and style images, see the plan, previews while it runs "
                       "(Gradio; pip install 'nsf[studio]')")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to bind (default: 127.0.0.1, this machine only; 0.0.0.0 exposes it: use --auth)")
    p.add_argument("--port", type=int, default=7860, help="port (default: 7860)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:N (default: the first GPU, else cpu)")
    p.add_argument("--weights", default="caffe", help="caffe, torchvision, or a state-dict path (default: caffe)")
    p.add_argument("--model-config", default=None,
                   help="the model-config.yaml with the limits the page enforces, as the servers do "
                        "(default: deploy/model-config.yaml of the checkout)")
    p.add_argument("--auth", default=None, metavar="USER:PASSWORD", help="require this login (basic auth page)")
    p.add_argument("--auth-file", default=None, metavar="PATH",
                   help="require a login from this file: one user:password a line")


def main(args: argparse.Namespace) -> int:
    import torch

    from .studio import launch, parse_auth, read_model_config

    config = read_model_config(args.model_config)
    auth = parse_auth(args.auth, args.auth_file)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    launch(config, host=args.host, port=args.port, device=device, weights=args.weights, auth=auth)
    return 0
