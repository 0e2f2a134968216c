"""The limits a graph puts on media (spec.media), as the workers receive them on their command line."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class MediaPolicy:
    allowed_schemes: frozenset[str] = frozenset({"https", "data"})
    allow_private_networks: bool = False
    max_items: int = 8
    max_bytes: int = 20 * 1024 * 1024
    max_pixels: int = 4096 * 4096
    max_frames: int = 64
    max_seconds: float = 600.0
    fetch_timeout_seconds: float = 10.0
    modalities: frozenset[str] = frozenset({"image"})

    @staticmethod
    def add_arguments(parser) -> None:
        """The flags commands.py emits from spec.media (one mapping, two ends)."""
        parser.add_argument("--modalities", default="image")
        parser.add_argument("--max-items", type=int, default=8)
        parser.add_argument("--max-bytes", type=int, default=20 * 1024 * 1024)
        parser.add_argument("--max-pixels", type=int, default=4096 * 4096)
        parser.add_argument("--max-frames", type=int, default=64)
        parser.add_argument("--max-seconds", type=float, default=600.0)
        parser.add_argument("--allowed-schemes", default="https,data")
        parser.add_argument("--allow-private-networks", action="store_true")
        parser.add_argument("--fetch-timeout-seconds", type=float, default=10.0)

    @classmethod
    def from_args(cls, args) -> MediaPolicy:
        return cls(
            allowed_schemes=frozenset(s for s in args.allowed_schemes.split(",") if s),
            allow_private_networks=args.allow_private_networks,
            max_items=args.max_items,
            max_bytes=args.max_bytes,
            max_pixels=args.max_pixels,
            max_frames=args.max_frames,
            max_seconds=args.max_seconds,
            fetch_timeout_seconds=args.fetch_timeout_seconds,
            modalities=frozenset(m for m in args.modalities.split(",") if m),
        )
