"""The audio loader (media/audio.py): the samples vLLM's own loader reads for the same bytes, resampling as librosa
does, refusals a person can act on, and memory that does not grow with a file's channel count."""

from __future__ import annotations

import io
import time
import tracemalloc

import numpy as np
import pytest

from mmgraph_contract.graph import MediaSpec
from mmgraph_workers.media import MediaError
from mmgraph_workers.media.audio import AudioFormat, decode_audio
from mmgraph_workers.media.samples import tone

QWEN2_AUDIO = AudioFormat(rate=16000, max_seconds=30.0)


def load(data: bytes, policy: MediaSpec | None = None, model: AudioFormat = QWEN2_AUDIO, timeout: float = 30):
    return decode_audio(data, policy or MediaSpec(), model, time.monotonic() + timeout)


SAME_AS_VLLM = {
    "wav pcm16 mono": tone(seconds=1.5),
    "wav float stereo": tone(seconds=1.5, channels=2, subtype="FLOAT"),
    "wav 6 channels": tone(seconds=1.5, channels=6),
    "flac": tone(seconds=1.5, format="FLAC"),
    "mp3": tone(seconds=1.5, format="MP3"),
    "ogg vorbis": tone(seconds=1.5, format="OGG"),
}


@pytest.mark.parametrize("name", list(SAME_AS_VLLM))
def test_16khz_audio_gives_vllms_samples(name):
    """vLLM's server reads audio with libsndfile and averages the channels; at the model's rate it resamples
    nothing, so its samples are the model's input: ours must be the same, bit for bit."""
    from vllm.multimodal.media.audio import load_audio_soundfile

    theirs, rate = load_audio_soundfile(io.BytesIO(SAME_AS_VLLM[name]), sr=None)
    ours = load(SAME_AS_VLLM[name])
    assert rate == ours.rate == 16000
    assert ours.samples.dtype == np.float32 and np.array_equal(ours.samples, theirs)


def test_the_clips_differ():
    """Control: the samples above are not all alike (a loader returning one clip for all would fail here)."""
    clips = [load(SAME_AS_VLLM[name]).samples for name in ("wav pcm16 mono", "wav float stereo", "wav 6 channels")]
    assert not np.array_equal(clips[0], clips[1]) and not np.array_equal(clips[1], clips[2])


@pytest.mark.parametrize("rate", [8000, 22050, 44100, 48000])
def test_other_rates_are_resampled_as_librosa_does(rate):
    import librosa

    data = tone(seconds=2.0, rate=rate, channels=2)
    expected, _ = librosa.load(io.BytesIO(data), sr=16000, mono=True)
    ours = load(data)
    assert ours.native_rate == rate and ours.rate == 16000
    assert len(ours.samples) == len(expected) == 32000
    np.testing.assert_allclose(ours.samples, expected, atol=1e-6)


def test_refusals_name_what_to_change():
    with pytest.raises(MediaError, match="empty"):
        load(b"")
    with pytest.raises(MediaError, match="cannot decode the audio"):
        load(b"RIFF\x00\x00\x00\x00WAVEfmt garbage")
    with pytest.raises(MediaError, match="cannot decode the audio"):
        load(b"\x89PNG\r\n\x1a\n" + bytes(100))
    with pytest.raises(MediaError, match="not a flac, mp3, ogg, wav file"):
        load(tone(seconds=0.5, format="AIFF"))
    with pytest.raises(MediaError, match="no samples"):
        load(tone(seconds=0.0))
    with pytest.raises(MediaError, match=r"at most 30 s of audio") as over_model:
        load(tone(seconds=31.0))
    assert over_model.value.status == 400
    with pytest.raises(MediaError, match=r"over the 10 s limit \(spec.media.maxSeconds\)") as over_cap:
        load(tone(seconds=12.0), MediaSpec(max_seconds=10))
    assert over_cap.value.status == 413
    with pytest.raises(MediaError, match="took too long") as late:
        load(tone(seconds=2.0), timeout=-1)
    assert late.value.status == 408


CUT_SHORT = {
    "mp3 stereo": tone(seconds=1.5, channels=2, format="MP3"),
    "ogg 6 channels": tone(seconds=1.5, channels=6, format="OGG"),
    "wav 6 channels": tone(seconds=1.5, channels=6),
}


@pytest.mark.parametrize("name", list(CUT_SHORT))
def test_a_file_cut_short_gives_vllms_samples_and_nothing_else(name):
    """A file that ends before its header says: vLLM's loader returns the frames that decode. So must ours, and
    never pad them (a reused read buffer would pad with an earlier file's samples: decode a loud one first)."""
    from vllm.multimodal.media.audio import load_audio_soundfile

    load(tone(seconds=1.5, channels=6, subtype="FLOAT"))
    cut = CUT_SHORT[name][: len(CUT_SHORT[name]) // 2]
    theirs, _ = load_audio_soundfile(io.BytesIO(cut), sr=None)
    ours = load(cut)
    assert 0 < len(ours.samples) < 24000 and np.array_equal(ours.samples, theirs)


def test_a_file_cut_where_nothing_decodes_is_a_400():
    with pytest.raises(MediaError, match="cannot decode the audio"):  # FLAC: "decoder lost sync" (vLLM raises too)
        load(SAME_AS_VLLM["flac"][: len(SAME_AS_VLLM["flac"]) // 2])
    with pytest.raises(MediaError, match="no samples"):  # a mono Ogg cut in its first page: vLLM returns nothing
        load(SAME_AS_VLLM["ogg vorbis"][: len(SAME_AS_VLLM["ogg vorbis"]) // 2])


def test_samples_that_are_not_numbers_are_refused():
    import soundfile

    for rate in (16000, 44100):
        samples = np.zeros(rate, np.float32)
        samples[100] = np.nan
        buf = io.BytesIO()
        soundfile.write(buf, samples, rate, format="WAV", subtype="FLOAT")
        with pytest.raises(MediaError, match="not numbers"):
            load(buf.getvalue())


def test_a_header_that_promises_too_much_decoding_is_refused_before_decoding(monkeypatch):
    """The decoded size (all channels, float32) is checked from the header: here a 1 MiB cap and a 2 s 8-channel
    48 kHz file (3 MiB of samples)."""
    import mmgraph_workers.media.audio as audio

    monkeypatch.setattr(audio, "MAX_DECODED_BYTES", 1 << 20)
    with pytest.raises(MediaError, match="would decode to 2 MiB of samples") as big:
        load(tone(seconds=2.0, rate=48000, channels=8))
    assert big.value.status == 413


def test_memory_is_one_channel_not_all_of_them():
    """A 30 s 48 kHz 8-channel float WAV is 46 MB of samples. vLLM's loader holds them all at once; ours reads in
    blocks and keeps only the mono mix (5.8 MB at 48 kHz, 1.9 MB once resampled)."""
    from vllm.multimodal.media.audio import load_audio_soundfile

    data = tone(seconds=30.0, rate=48000, channels=8, subtype="FLOAT")
    load(tone(seconds=0.5, rate=8000))  # librosa imported (on first use) before, not while, memory is measured
    tracemalloc.start()
    try:
        load_audio_soundfile(io.BytesIO(data), sr=None)
        _, theirs = tracemalloc.get_traced_memory()
        tracemalloc.reset_peak()
        baseline, _ = tracemalloc.get_traced_memory()
        load(data)
        _, ours = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert theirs > 46e6  # the evidence: all channels at once
    assert ours - baseline < 20e6, f"peak {(ours - baseline) / 1e6:.1f} MB"
