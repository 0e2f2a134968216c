"""Audio: bytes to mono float32 samples at the model's rate, read as vLLM's loader reads them.

vLLM's server reads audio with libsndfile (soundfile: WAV, FLAC, MP3, Ogg), averages the channels, then
resamples to the feature extractor's rate. This module reads the same samples (so 16 kHz audio gives the same
tokens as vLLM's server where it reads with libsndfile, as on a CPU node without torchcodec), with three
differences that matter in a shared worker:
- the file is read in blocks and mixed down to mono as it is read, so a many-channel file costs one channel of
  memory, not all of them at once;
- only WAV, FLAC, MP3 and Ogg bytes reach libsndfile (it knows twenty-odd containers), and the length and the
  decoded size are checked from the header before decoding, against the graph's cap (spec.media.maxSeconds) and
  the model's own limit (Qwen2-Audio takes 30 s: vLLM's processor truncates longer audio without a word, so
  mmgraph refuses it, naming the limit); libsndfile decodes no more than the header declares;
- resampling is librosa's (soxr, high quality). vLLM resamples with torchaudio by default, so audio at another
  rate gives other samples there (and none on a CPU set-up without torchaudio: see docs/architecture.md).
"""

from __future__ import annotations

import io
import time
from dataclasses import dataclass

import numpy as np
import soundfile

from mmgraph_contract.graph import MediaSpec
from mmgraph_workers.media import MediaError

# libsndfile's container names (what it sniffs from the bytes, whatever the request says the format is)
FORMATS = {"WAV": "wav", "WAVEX": "wav", "FLAC": "flac", "MP3": "mp3", "OGG": "ogg"}
# the `format` values of OpenAI's `input_audio` parts this accepts (OpenAI's own: wav, mp3)
INPUT_FORMATS = frozenset(FORMATS.values())
MAX_RATE = 384_000  # samples per second; above is not audio anyone records
MAX_CHANNELS = 64
BLOCK = 1 << 16  # frames read at a time (2 MB of an 8-channel float file)
MAX_DECODED_BYTES = 256 << 20  # float32 samples of all channels: vLLM's default cap (VLLM_MAX_AUDIO_DECODE_BYTES)
RESAMPLER = "soxr_hq"  # librosa's default


@dataclass(frozen=True)
class AudioFormat:
    """What a model's feature extractor takes: its sampling rate, and the longest audio it represents whole."""

    rate: int
    max_seconds: float


@dataclass(frozen=True)
class Audio:
    """Mono float32 samples at `rate`; `native_rate` is the file's."""

    samples: np.ndarray
    rate: int
    native_rate: int

    @property
    def seconds(self) -> float:
        return len(self.samples) / self.rate


def decode_audio(data: bytes, policy: MediaSpec, model: AudioFormat, deadline: float) -> Audio:
    """The audio in `data` as `model` takes it, or MediaError saying what to change; decoding stops at `deadline`
    (time.monotonic())."""
    kinds = ", ".join(sorted(INPUT_FORMATS))
    if not data:
        raise MediaError("the audio is empty (0 bytes)")
    if not _sniffed(data):  # libsndfile parses only the containers accepted, not all it knows
        raise MediaError(f"cannot decode the audio: not a {kinds} file")
    try:
        with soundfile.SoundFile(io.BytesIO(data)) as f:
            _check_header(f, policy, model)
            mono = _read_mono(f, deadline)
            native = f.samplerate
    except MediaError:
        raise
    except (soundfile.LibsndfileError, RuntimeError, TypeError) as err:
        raise MediaError(f"cannot decode the audio ({_reason(err)}): send a whole {kinds} file") from None
    if not len(mono):
        raise MediaError("the audio has no samples")
    if not np.isfinite(mono).all():  # a float WAV can hold them; the model would compute NaN from them
        raise MediaError("the audio has samples that are not numbers (NaN or infinity)")
    if native != model.rate:
        import librosa

        mono = librosa.resample(mono, orig_sr=native, target_sr=model.rate, res_type=RESAMPLER).astype(np.float32)
    return Audio(mono, model.rate, native)


def _sniffed(data: bytes) -> bool:
    """The bytes start as one of FORMATS' containers does: RIFF/WAVE, FLAC, Ogg, or MP3 (an ID3 tag or a frame)."""
    head = data[:12]
    wav = head[:4] == b"RIFF" and head[8:12] == b"WAVE"
    mp3 = head[:3] == b"ID3" or (len(head) > 1 and head[0] == 0xFF and head[1] & 0xE0 == 0xE0)
    return wav or mp3 or head[:4] in (b"fLaC", b"OggS")


def _check_header(f: soundfile.SoundFile, policy: MediaSpec, model: AudioFormat) -> None:
    """Refuse what the header already shows is unusable. libsndfile reads no more frames than the header
    declares, so these bound the decoding work too."""
    if f.format not in FORMATS:
        raise MediaError(f"audio in {f.format} is not accepted: send {', '.join(sorted(INPUT_FORMATS))}")
    if not 0 < f.samplerate <= MAX_RATE or not 0 < f.channels <= MAX_CHANNELS:
        raise MediaError(f"audio of {f.channels} channels at {f.samplerate} Hz is refused")
    _check_length(f.frames / f.samplerate, policy, model)
    decoded = f.frames * f.channels * 4
    if decoded > MAX_DECODED_BYTES:
        raise MediaError(
            f"the audio would decode to {decoded >> 20} MiB of samples ({f.channels} channels at "
            f"{f.samplerate} Hz), more than the {MAX_DECODED_BYTES >> 20} MiB allowed",
            status=413,
        )


def _check_length(seconds: float, policy: MediaSpec, model: AudioFormat) -> None:
    if seconds > policy.max_seconds:
        raise MediaError(
            f"the audio is {seconds:.1f} s long, over the {policy.max_seconds:g} s limit (spec.media.maxSeconds)",
            status=413,
        )
    if seconds > model.max_seconds:
        raise MediaError(
            f"the audio is {seconds:.1f} s long; this model takes at most {model.max_seconds:g} s of audio per "
            "item: cut it into parts"
        )


def _read_mono(f: soundfile.SoundFile, deadline: float) -> np.ndarray:
    """The channels' mean as vLLM computes it (`np.mean` over the channel axis: the same float32 operations), a
    block at a time when there are several channels, so they are never all held at once. (`SoundFile.blocks` is
    not used: it reuses one buffer and, where a file ends before its header says, yields the stale end of the
    previous block, which could be another request's audio.)"""
    if f.channels == 1:  # one channel: reading it whole costs what the result does
        mono = f.read(dtype="float32")
    else:
        blocks: list[np.ndarray] = []
        while len(block := f.read(BLOCK, dtype="float32", always_2d=True)):
            blocks.append(block.T.mean(axis=0))
            _in_time(deadline)
        mono = np.concatenate(blocks) if blocks else np.zeros(0, np.float32)
    _in_time(deadline)
    return mono


def _in_time(deadline: float) -> None:
    if time.monotonic() > deadline:
        raise MediaError("decoding the audio took too long", status=408)


def _reason(err: Exception) -> str:
    text = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return text.removeprefix("Error opening <_io.BytesIO object at ").split(">: ", 1)[-1]
