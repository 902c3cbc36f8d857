"""Audio decoding (soundfile) and log-mel features (torch.stft): no torchaudio needed.

torchaudio has no build matching current torch, so decoding goes through soundfile (FLAC, WAV,
OGG) and the mel filterbank is computed here. LAION CLAP's setting is 48 kHz, 10 s, 64 mels,
n_fft 1024, hop 480; the embedded `tones` demo uses a smaller one (see configs/).
"""

from __future__ import annotations

import functools
import io
from dataclasses import dataclass

import numpy as np
import torch

from pipeline.core.errors import ConfigError


@dataclass
class AudioConfig:
    sample_rate: int = 48000
    """Waveforms are resampled to this rate (Hz) before features are computed."""
    clip_seconds: float = 10.0
    """Every clip is cropped (random offset in training, start in eval) or zero-padded to this length."""
    n_mels: int = 64
    """Mel bands."""
    n_fft: int = 1024
    """STFT window and FFT size (samples)."""
    hop_length: int = 480
    """STFT hop (samples)."""
    f_min: float = 50.0
    """Lowest mel filter edge (Hz)."""
    f_max: float = 14000.0
    """Highest mel filter edge (Hz); clipped to the Nyquist frequency."""

    def __post_init__(self):
        if self.sample_rate <= 0 or self.clip_seconds <= 0:
            raise ConfigError("audio.sample_rate and audio.clip_seconds must be positive")
        if self.hop_length <= 0 or self.n_fft <= 0 or self.n_mels <= 0:
            raise ConfigError("audio.n_fft, audio.hop_length and audio.n_mels must be positive")
        if not 0 <= self.f_min < self.f_max:
            raise ConfigError(f"audio.f_min ({self.f_min}) must be below audio.f_max ({self.f_max})")

    @property
    def num_samples(self) -> int:
        return int(round(self.sample_rate * self.clip_seconds))

    @property
    def num_frames(self) -> int:
        """Frames of the log-mel of one clip (centred STFT)."""
        return self.num_samples // self.hop_length + 1


def decode_audio(data: bytes) -> tuple[np.ndarray, int]:
    """Bytes of a FLAC/WAV/OGG file -> (mono float32 waveform, sample rate). Raises on corrupt data."""
    import soundfile

    with soundfile.SoundFile(io.BytesIO(data)) as sound:
        waveform = sound.read(dtype="float32", always_2d=True)
        rate = sound.samplerate
    if waveform.shape[0] == 0:
        raise ValueError("audio file holds no samples")
    return waveform.mean(axis=1), rate


def resample(waveform: torch.Tensor, orig_rate: int, new_rate: int) -> torch.Tensor:
    """Band-limited resampling by linear interpolation after a low-pass in the frequency domain."""
    if orig_rate == new_rate:
        return waveform
    length = waveform.shape[-1]
    new_length = max(1, int(round(length * new_rate / orig_rate)))
    if new_rate < orig_rate:  # remove what the new rate cannot hold before decimating
        spectrum = torch.fft.rfft(waveform)
        cutoff = int(spectrum.shape[-1] * new_rate / orig_rate)
        spectrum[..., cutoff:] = 0
        waveform = torch.fft.irfft(spectrum, n=length)
    return torch.nn.functional.interpolate(
        waveform.reshape(1, 1, -1), size=new_length, mode="linear", align_corners=False
    ).reshape(new_length)


def fit_length(waveform: torch.Tensor, num_samples: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Crop to `num_samples` (random offset when a generator is given, else from the start) or zero-pad."""
    length = waveform.shape[-1]
    if length > num_samples:
        if generator is not None:
            start = int(torch.randint(0, length - num_samples + 1, (1,), generator=generator))
        else:
            start = 0
        return waveform[..., start : start + num_samples]
    if length < num_samples:
        return torch.nn.functional.pad(waveform, (0, num_samples - length))
    return waveform


def _hz_to_mel(freq):
    return 2595.0 * np.log10(1.0 + np.asarray(freq) / 700.0)


def _mel_to_hz(mel):
    return 700.0 * (10.0 ** (np.asarray(mel) / 2595.0) - 1.0)


@functools.lru_cache(maxsize=8)
def mel_filterbank(sample_rate: int, n_fft: int, n_mels: int, f_min: float, f_max: float) -> torch.Tensor:
    """Triangular HTK-mel filters, Slaney-normalised: shape [n_fft // 2 + 1, n_mels]."""
    f_max = min(f_max, sample_rate / 2)
    fft_freqs = np.linspace(0, sample_rate / 2, n_fft // 2 + 1)
    mel_points = np.linspace(_hz_to_mel(f_min), _hz_to_mel(f_max), n_mels + 2)
    hz_points = _mel_to_hz(mel_points)
    lower, centre, upper = hz_points[:-2], hz_points[1:-1], hz_points[2:]
    rising = (fft_freqs[:, None] - lower[None, :]) / (centre - lower)[None, :]
    falling = (upper[None, :] - fft_freqs[:, None]) / (upper - centre)[None, :]
    filters = np.maximum(0.0, np.minimum(rising, falling))
    filters *= (2.0 / (upper - lower))[None, :]  # equal area per band
    return torch.from_numpy(filters.astype(np.float32))


def log_mel(waveform: torch.Tensor, cfg: AudioConfig) -> torch.Tensor:
    """Waveform [..., samples] at cfg.sample_rate -> log-mel [..., n_mels, frames] (natural log, floored)."""
    window = torch.hann_window(cfg.n_fft, device=waveform.device)
    batch_shape = waveform.shape[:-1]
    spec = torch.stft(
        waveform.reshape(-1, waveform.shape[-1]).float(), n_fft=cfg.n_fft, hop_length=cfg.hop_length,
        window=window, center=True, pad_mode="reflect" if waveform.shape[-1] > cfg.n_fft // 2 else "constant",
        return_complex=True,
    )
    power = spec.abs().pow(2)  # [B, freq, frames]
    filters = mel_filterbank(cfg.sample_rate, cfg.n_fft, cfg.n_mels, cfg.f_min, cfg.f_max).to(power.device)
    mel = torch.einsum("bft,fm->bmt", power, filters)
    features = torch.log(mel.clamp_min(1e-10))
    return features.reshape(*batch_shape, cfg.n_mels, features.shape[-1])
