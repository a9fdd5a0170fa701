"""Log-mel front ends of the audio encoders: VGGish (Maria+Audio) and Whisper (speech-aware).

Both run on the host in numpy (float64, then float32): a video's audio is a few seconds of
16 kHz samples, so the spectrogram costs milliseconds next to decoding, and host-side features
let batches of fixed shape go to the accelerator.

VGGish, exactly as `research/audioset/vggish/mel_features.py` (TF) defines it:
  16 kHz mono; frames of 400 samples (25 ms) every 160 (10 ms), no centering/padding, periodic
  Hann, zero-padded to an FFT of 512; magnitude (not power) spectrum; 64 mel bands 125-7500 Hz
  whose triangles are linear in HTK *mel* (not Hz), unnormalised (peak 1), the DC bin zeroed;
  log(mel + 0.01); non-overlapping examples of 96 frames (0.96 s).
librosa is used where it computes the same thing (framing, periodic Hann, HTK hz->mel, FFT bin
frequencies, resampling). It is not used for the STFT (librosa centres a 400-sample window inside
each 512-sample frame, which shifts the analysed samples) nor for the filterbank
(`librosa.filters.mel` draws triangles linear in Hz).

Whisper, as `WhisperFeatureExtractor` defines it (and OpenAI's `log_mel_spectrogram`): each 30 s
chunk zero-padded to 480000 samples, centred STFT with reflect padding, periodic Hann 400, FFT
400, hop 160, power spectrum, Slaney-scale Slaney-normalised mel filters 0-8000 Hz (librosa's,
from which OpenAI's `mel_filters.npz` was made), log10 floored at 1e-10, clamped to 8 below the
chunk's maximum, then (x + 4) / 4; the last STFT frame dropped, giving 3000 frames. The HF
extractor is not called directly: it computes with torch or numpy depending on whether torch is
installed (a test-only dependency here) and handles one 30 s window only; it is the reference
this implementation is tested against (`tests/test_whisper.py`).
"""

from __future__ import annotations

import librosa
import numpy as np

SAMPLE_RATE = 16000

# VGGish (vggish_params.py).
VGGISH_WINDOW = 400  # 25 ms
VGGISH_HOP = 160  # 10 ms
VGGISH_FFT = 512  # next power of two above the window
VGGISH_MEL_BANDS = 64
VGGISH_MEL_MIN_HZ = 125.0
VGGISH_MEL_MAX_HZ = 7500.0
VGGISH_LOG_OFFSET = 0.01
VGGISH_EXAMPLE_FRAMES = 96  # 0.96 s, non-overlapping

# Whisper (WhisperFeatureExtractor defaults).
WHISPER_FFT = 400
WHISPER_HOP = 160
WHISPER_CHUNK_SAMPLES = 30 * SAMPLE_RATE
WHISPER_FRAMES = WHISPER_CHUNK_SAMPLES // WHISPER_HOP  # 3000


def to_mono_float(waveform: np.ndarray, sample_rate: int) -> np.ndarray:
    """int16 or float audio [N] or [N, channels] at any rate -> float64[M] in [-1, 1] at 16 kHz.

    int16 is scaled by 1/32768 (as VGGish's `wavfile_to_examples`); channels are averaged.
    Resampling uses librosa's default (soxr); VGGish's own code used resampy, so features of
    audio not already at 16 kHz differ slightly from the original pipeline. The dataset stores
    16 kHz audio, which is passed through untouched.
    """
    waveform = np.asarray(waveform)
    if waveform.dtype == np.int16:
        waveform = waveform / 32768.0
    waveform = waveform.astype(np.float64)
    if waveform.ndim == 2:
        waveform = waveform.mean(axis=1)
    elif waveform.ndim != 1:
        raise ValueError(f"audio must be [samples] or [samples, channels], got {waveform.shape}")
    if sample_rate != SAMPLE_RATE:
        waveform = librosa.resample(waveform, orig_sr=sample_rate, target_sr=SAMPLE_RATE)
    return waveform


def vggish_mel_matrix(
    num_mel_bins: int = VGGISH_MEL_BANDS,
    fft_length: int = VGGISH_FFT,
    sample_rate: int = SAMPLE_RATE,
    lower_hz: float = VGGISH_MEL_MIN_HZ,
    upper_hz: float = VGGISH_MEL_MAX_HZ,
) -> np.ndarray:
    """float64[fft_length // 2 + 1, num_mel_bins]: magnitude spectrum @ matrix = mel spectrum."""
    if not 0.0 <= lower_hz < upper_hz <= sample_rate / 2:
        raise ValueError(f"need 0 <= lower_hz < upper_hz <= Nyquist, got {lower_hz}, {upper_hz}")
    bins_mel = librosa.hz_to_mel(
        librosa.fft_frequencies(sr=sample_rate, n_fft=fft_length), htk=True
    )
    edges = np.linspace(
        librosa.hz_to_mel(lower_hz, htk=True),
        librosa.hz_to_mel(upper_hz, htk=True),
        num_mel_bins + 2,
    )
    lower, center, upper = edges[:-2], edges[1:-1], edges[2:]
    rising = (bins_mel[:, None] - lower) / (center - lower)
    falling = (upper - bins_mel[:, None]) / (upper - center)
    weights = np.maximum(0.0, np.minimum(rising, falling))
    weights[0, :] = 0.0  # HTK leaves out the DC bin
    return weights


def vggish_log_mel(waveform: np.ndarray, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """Audio -> float32[T, 64] log-mel frames, T = 1 + (N - 400) // 160 (0 when N < 400)."""
    x = to_mono_float(waveform, sample_rate)
    if x.shape[0] < VGGISH_WINDOW:
        return np.zeros((0, VGGISH_MEL_BANDS), np.float32)
    frames = librosa.util.frame(x, frame_length=VGGISH_WINDOW, hop_length=VGGISH_HOP, axis=0)
    window = librosa.filters.get_window("hann", VGGISH_WINDOW, fftbins=True)  # periodic
    magnitude = np.abs(np.fft.rfft(frames * window, n=VGGISH_FFT))
    mel = magnitude @ vggish_mel_matrix()
    return np.log(mel + VGGISH_LOG_OFFSET).astype(np.float32)


def vggish_examples(waveform: np.ndarray, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """Audio -> float32[n, 96, 64]: one VGGish input per whole 0.96 s; a partial tail is dropped."""
    log_mel = vggish_log_mel(waveform, sample_rate)
    n = log_mel.shape[0] // VGGISH_EXAMPLE_FRAMES
    return log_mel[: n * VGGISH_EXAMPLE_FRAMES].reshape(n, VGGISH_EXAMPLE_FRAMES, VGGISH_MEL_BANDS)


def whisper_mel_filters(num_mel_bins: int = 80) -> np.ndarray:
    """float64[num_mel_bins, 201]: Whisper's Slaney mel filterbank (80 bins; 128 for large-v3)."""
    return librosa.filters.mel(
        sr=SAMPLE_RATE, n_fft=WHISPER_FFT, n_mels=num_mel_bins, fmin=0.0, fmax=SAMPLE_RATE / 2,
        htk=False, norm="slaney", dtype=np.float64,
    )  # fmt: skip


def whisper_log_mel(
    waveform: np.ndarray, sample_rate: int = SAMPLE_RATE, num_mel_bins: int = 80
) -> tuple[np.ndarray, np.ndarray]:
    """Audio -> Whisper encoder inputs, one per started 30 s chunk.

    Returns:
      features: float32[C, num_mel_bins, 3000], C = ceil(N / 480000) (0 for empty audio).
      frames: int32[C], the number of the 3000 frames covering real audio in each chunk (the rest
        is zero padding; the encoder halves it: valid outputs = ceil(frames / 2)).
    """
    x = to_mono_float(waveform, sample_rate)
    num_chunks = -(-x.shape[0] // WHISPER_CHUNK_SAMPLES)
    filters = whisper_mel_filters(num_mel_bins)
    out = np.zeros((num_chunks, num_mel_bins, WHISPER_FRAMES), np.float32)
    frames = np.zeros((num_chunks,), np.int32)
    for c in range(num_chunks):
        chunk = x[c * WHISPER_CHUNK_SAMPLES : (c + 1) * WHISPER_CHUNK_SAMPLES]
        frames[c] = -(-chunk.shape[0] // WHISPER_HOP)
        chunk = np.pad(chunk, (0, WHISPER_CHUNK_SAMPLES - chunk.shape[0]))
        stft = librosa.stft(
            chunk, n_fft=WHISPER_FFT, hop_length=WHISPER_HOP, window="hann", center=True,
            pad_mode="reflect",
        )  # fmt: skip
        power = np.abs(stft[:, :-1]) ** 2  # [201, 3000]
        log_spec = np.log10(np.maximum(filters @ power, 1e-10))
        log_spec = np.maximum(log_spec, log_spec.max() - 8.0)
        out[c] = (log_spec + 4.0) / 4.0
    return out, frames
