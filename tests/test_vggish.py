"""VGGish: the log-mel front end against an independent numpy computation of the TF definition,
and the network against an equivalent torch model with the torchvggish state-dict naming."""

import math

import jax
import numpy as np
import pytest
import torch
from flax import nnx
from safetensors.torch import save_file

from tiktalk_jax import audio_features as af
from tiktalk_jax.models import hf_import, layers, vggish


def _reference_log_mel(x: np.ndarray) -> np.ndarray:
    """The VGGish definition spelled out with loops and scalar formulas (no librosa)."""
    sr, win, hop, nfft, bands, lo, hi = 16000, 400, 160, 512, 64, 125.0, 7500.0

    def mel(f):
        return 1127.0 * math.log(1.0 + f / 700.0)

    n_frames = 1 + (len(x) - win) // hop
    hann = np.array([0.5 - 0.5 * math.cos(2 * math.pi * n / win) for n in range(win)])
    spec = np.empty((n_frames, nfft // 2 + 1))
    for t in range(n_frames):
        padded = np.zeros(nfft)
        padded[:win] = x[t * hop : t * hop + win] * hann
        spec[t] = np.abs(np.fft.fft(padded)[: nfft // 2 + 1])
    edges = [mel(lo) + i * (mel(hi) - mel(lo)) / (bands + 1) for i in range(bands + 2)]
    weights = np.zeros((nfft // 2 + 1, bands))
    for k in range(1, nfft // 2 + 1):  # the DC bin keeps weight 0
        m = mel(k * sr / nfft)
        for b in range(bands):
            left, center, right = edges[b], edges[b + 1], edges[b + 2]
            if left < m <= center:
                weights[k, b] = (m - left) / (center - left)
            elif center < m < right:
                weights[k, b] = (right - m) / (right - center)
    return np.log(spec @ weights + 0.01)


def _test_audio(seconds: float, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * 16000)) / 16000
    tone = 0.3 * np.sin(2 * np.pi * 440 * t) + 0.2 * np.sin(2 * np.pi * 3100 * t * (1 + t))
    return ((tone + 0.05 * rng.normal(size=t.shape)) * 32767 * 0.5).astype(np.int16)


def test_front_end_matches_independent_definition():
    audio = _test_audio(2.05)
    ours = af.vggish_log_mel(audio)
    want = _reference_log_mel(audio / 32768.0)
    assert ours.shape == want.shape == (1 + (len(audio) - 400) // 160, 64)
    np.testing.assert_allclose(ours, want, atol=2e-5, rtol=0)


def test_examples_and_edge_cases():
    audio = _test_audio(2.05)
    examples = af.vggish_examples(audio)
    # 203 frames -> two whole 0.96 s examples, the partial third dropped.
    assert examples.shape == (2, 96, 64) and examples.dtype == np.float32
    np.testing.assert_array_equal(examples[1], af.vggish_log_mel(audio)[96:192])
    # Stereo int16 is averaged; float audio in [-1, 1] is taken as is.
    stereo = np.stack([audio, audio], axis=1)
    np.testing.assert_allclose(af.vggish_examples(stereo), examples, atol=1e-6)
    np.testing.assert_allclose(af.vggish_examples(audio / 32768.0), examples, atol=1e-6)
    assert af.vggish_examples(audio[:399]).shape == (0, 96, 64)
    assert af.vggish_examples(np.zeros(0, np.int16)).shape == (0, 96, 64)


def test_mel_matrix_properties():
    w = af.vggish_mel_matrix()
    assert w.shape == (257, 64)
    assert np.all(w[0] == 0) and np.all(w >= 0) and np.all(w <= 1)
    freqs = np.arange(257) * 16000 / 512
    assert np.all(w[freqs < 125] == 0) and np.all(w[freqs > 7500] == 0)


def _torch_vggish(cfg: vggish.VGGishConfig) -> torch.nn.Module:
    """torchvggish's `VGG` layout: `features` and `embeddings` Sequentials."""
    convs, cin = [], 1
    for v in cfg.plan():
        if v == "M":
            convs.append(torch.nn.MaxPool2d(2, 2))
        else:
            convs += [torch.nn.Conv2d(cin, v, 3, padding=1), torch.nn.ReLU()]
            cin = v
    flat = 6 * 4 * cin
    fc = [flat, *cfg.fc_widths, cfg.embedding_size]
    head = []
    for a, b in zip(fc[:-1], fc[1:]):
        head += [torch.nn.Linear(a, b), torch.nn.ReLU()]
    model = torch.nn.Module()
    model.features = torch.nn.Sequential(*convs)
    model.embeddings = torch.nn.Sequential(*head)
    return model


def _torch_forward(model, x, final_relu):
    h = model.features(x[:, None])  # [B, 1, 96, 64] -> [B, C, 6, 4]
    h = h.permute(0, 2, 3, 1).reshape(h.shape[0], -1)  # the port's channels-last flatten
    layers = list(model.embeddings)
    return torch.nn.Sequential(*(layers if final_relu else layers[:-1]))(h)


TINY = vggish.VGGishConfig(conv_widths=(4, 8, 8, 8, 16, 16), fc_widths=(32, 24), embedding_size=8)


@pytest.mark.parametrize("final_relu,suffix", [(True, ".pth"), (False, ".safetensors")])
def test_network_matches_torch(tmp_path, final_relu, suffix):
    torch.manual_seed(0)
    ref = _torch_vggish(TINY).eval()
    state = ref.state_dict()
    assert sorted(state)[:2] == ["embeddings.0.bias", "embeddings.0.weight"]
    file = str(tmp_path / f"vggish{suffix}")
    if suffix == ".pth":
        torch.save(state, file)
    else:
        save_file({k: v.contiguous() for k, v in state.items()}, file)
    model = vggish.VGGish.from_pretrained(file, final_relu=final_relu, cfg=TINY)
    x = af.vggish_examples(_test_audio(2.0, seed=1))
    with torch.no_grad():
        want = _torch_forward(ref, torch.from_numpy(x), final_relu).numpy()
    got = jax.jit(lambda m, x: m(x))(model, x)
    assert got.shape == (2, 8)
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)
    # Without the final ReLU some outputs are negative (what the TF original gives).
    assert (np.min(got) < 0) != final_relu


def test_sizes_random_init_and_postprocessor(tmp_path):
    full = hf_import.abstract_module(lambda: vggish.VGGish(rngs=nnx.Rngs(0)))
    assert full.embeddings[0].kernel.value.shape == (6 * 4 * 512, 4096)
    assert full.embeddings[2].kernel.value.shape == (4096, 128)
    assert layers.param_axes(full)["embeddings/0/kernel"] == (None, "mlp")
    a, b = vggish.VGGish.from_config(TINY, seed=1), vggish.VGGish.from_config(TINY, seed=1)
    x = af.vggish_examples(_test_audio(1.0))
    run = jax.jit(lambda m, x: m(x))
    np.testing.assert_array_equal(run(a, x), run(b, x))
    assert run(a, x).shape == (1, 8)

    rng = np.random.default_rng(0)
    vectors, means = rng.normal(size=(128, 128)), rng.normal(size=128)
    np.savez(tmp_path / "pca.npz", pca_eigen_vectors=vectors, pca_means=means)
    post = vggish.Postprocessor.from_file(str(tmp_path / "pca.npz"))
    emb = rng.normal(size=(3, 128)).astype(np.float32)
    got = np.asarray(post(emb))
    want = np.round((np.clip((emb - means) @ vectors.T, -2, 2) + 2) * 255 / 4)
    np.testing.assert_allclose(got, want, atol=1.0)  # float32 vs float64 rounding ties
    assert got.min() >= 0 and got.max() <= 255
