"""`gr2 train-tokenizer`, `gr2 tokenize`, `gr2 show`: the image tokenizer from the command line."""

from __future__ import annotations

import json

from gr2.flows.options import CommandError


def _settings(pairs: list[str] | None) -> dict:
    """--set KEY=VALUE pairs as TokenizerConfig settings; values parse as JSON, else stay text."""
    out = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise CommandError(f"--set {pair!r}: expected KEY=VALUE, e.g. patch_size=4 or channel_mult=[1,2]")
        try:
            out[key.strip()] = json.loads(value)
        except ValueError:
            out[key.strip()] = value
    return out


def train_tokenizer_cmd(args) -> str:
    from gr2.flows.tokenizer import train_tokenizer

    r = train_tokenizer(lake=args.lake, resolution=args.resolution, codebook=args.codebook, steps=args.steps,
                        workers=args.workers, downsample=args.downsample, batch_size=args.batch_size,
                        model=_settings(args.set))
    e = r["eval"]
    return (f"tokenizer {r['checkpoint_id']} saved to {r['checkpoint']}\n"
            f"held-out: PSNR {e.get('psnr_db', float('nan')):.2f} dB, codebook usage {e.get('codebook_usage', 0):.1%}, "
            f"perplexity {e.get('perplexity', float('nan')):.1f} ({r['frames'].get('train_frames')} training frames, "
            f"{r['frames'].get('held_out_frames')} held out, {r['steps']} steps, {r['workers']} workers)\n"
            f"tokenize the lake with it: gr2 tokenize --lake {args.lake} --tokenizer {r['checkpoint_id']}")


def tokenize_cmd(args) -> str:
    from gr2.flows.tokenizer import tokenize

    r = tokenize(lake=args.lake, tokenizer=args.tokenizer)
    return (f"tokenizer {r['tokenizer_id']}: {r['tokenized']} clips tokenized, {r['already']} already were, "
            f"{r['failed']} failed, of {r['accepted']} accepted; {r['episodes_tokenized']} robot episodes' steps "
            f"tokenized, {r['episodes_already']} already were, {r['episodes_failed']} failed, of {r['episodes']} accepted")


def show_cmd(args) -> str:
    from PIL import Image

    from gr2.lake.lake import Lake
    from gr2.video.tokenize import reconstruction_sheet

    sheet, facts = reconstruction_sheet(Lake(args.lake), args.clip_id)
    try:
        Image.fromarray(sheet).save(args.out, format="PNG")
    except OSError as e:
        raise CommandError(f"cannot write {args.out}: {e.strerror or e}") from None
    t, h, w = facts["token_shape"]
    return (f"wrote {args.out}: clip {facts['clip_id']}, {t} frames (top) and their reconstruction from {h}x{w} "
            f"tokens of tokenizer {facts['tokenizer_id']} (bottom), PSNR {facts['psnr_db']:.2f} dB")


def register(sub) -> None:
    p = sub.add_parser("train-tokenizer", help="train the lake's VQ image tokenizer on its frames")
    p.add_argument("--lake", required=True)
    p.add_argument("--resolution", type=int, default=64, help="frame side the tokenizer trains at (default 64)")
    p.add_argument("--codebook", type=int, default=1024, help="codebook size (default 1024)")
    p.add_argument("--downsample", type=int, default=8, help="pixels per token side, 8 or 16 (default 8)")
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--workers", type=int, default=1, help=">1: torch DDP over Ray Train workers")
    p.add_argument("--batch-size", type=int, default=32, help="frames per step per worker")
    p.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="any other TokenizerConfig setting, e.g. --set patch_size=4 --set channel_mult=[1,2]")
    p.set_defaults(run=train_tokenizer_cmd)

    p = sub.add_parser("tokenize", help="give accepted clips VQ tokens (re-tokenize with --tokenizer ID)")
    p.add_argument("--lake", required=True)
    p.add_argument("--tokenizer", help="checkpoint id under <lake>/models/tokenizers (default: the lake's current)")
    p.set_defaults(run=tokenize_cmd)

    p = sub.add_parser("show", help="a clip's frames beside their reconstruction from its tokens, as one PNG")
    p.add_argument("--lake", required=True)
    p.add_argument("clip_id", help="a clip id (or a unique prefix of one)")
    p.add_argument("--out", required=True, help="PNG file to write")
    p.set_defaults(run=show_cmd)
