"""Tests of the micro-Doppler simulator: the physics (torso Doppler, gait periodicity, no aliasing),
determinism, the image format and the dataset / CLI layout."""
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from matplotlib import colormaps
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from data import simulate as sim  # noqa: E402
from data.simulate import (BODY_PARTS, PRF, WAVELENGTH, GaitParams, body_positions,  # noqa: E402
                           radar_return, render_image, sample_user, simulate_image, spectrogram_db)


def _torso_doppler(params: GaitParams, t: np.ndarray, range_m: float, radar_height: float = 1.0) -> np.ndarray:
    """Doppler (Hz) of the torso from the body model alone: its velocity along the line of sight."""
    torso = body_positions(params, t)[:, BODY_PARTS.index("torso")]
    dist = np.linalg.norm(np.array([range_m, 0.0, radar_height]) - torso, axis=-1)
    return -2.0 * np.gradient(dist, t) / WAVELENGTH


#################################################################################
#                                 Body model                                    #
#################################################################################

def test_body_positions_shape_and_anatomy():
    p = GaitParams(height=1.8)
    t = np.arange(0, 2.0, 1 / 500)
    pos = body_positions(p, t)
    assert len(BODY_PARTS) == 16 and pos.shape == (t.size, 16, 3)
    z = pos[..., 2]
    i = BODY_PARTS.index
    assert 0.85 * 1.8 < z[:, i("head")].mean() < 1.8              # head near the top
    assert z[:, i("left_foot")].min() < 0.1 and z[:, i("right_foot")].min() < 0.1   # feet reach the ground
    assert np.all(z[:, i("torso")] > z[:, i("left_hip")]) and np.all(z[:, i("left_hip")] > z[:, i("left_lower_leg")])


def test_kinematics_torso_legs_arms():
    """Torso at the walking speed with a small oscillation, feet up to ~3-4x, arms opposite to legs."""
    p = GaitParams()
    t = np.arange(0, 10 * p.cycle_duration(), 1 / 1000)           # whole cycles: means are exact
    vx = np.gradient(body_positions(p, t)[..., 0], t, axis=0)
    i = BODY_PARTS.index
    torso = vx[:, i("torso")]
    assert abs(torso.mean() - p.speed()) < 0.01 * p.speed()
    assert torso.std() < 0.2 * p.speed()
    for side in ("left", "right"):
        foot = vx[:, i(f"{side}_foot")]
        assert 3.0 < foot.max() / p.speed() < 4.5
        assert foot.min() < 0.4 * p.speed()                        # (near) standing still in stance
        assert abs(foot.mean() - p.speed()) < 0.02 * p.speed()     # the body moves as a whole
        other = "left" if side == "right" else "right"
        # An arm swings with the opposite leg, against the same-side leg.
        assert np.corrcoef(foot, vx[:, i(f"{side}_lower_arm")])[0, 1] < -0.3
        assert np.corrcoef(foot, vx[:, i(f"{other}_lower_arm")])[0, 1] > 0.3


def test_ellipsoid_rcs_limits():
    a, c = np.array([0.1]), np.array([0.3])
    assert np.allclose(sim._ellipsoid_rcs(a, a, np.array([0.3])), np.pi * 0.1 ** 2)     # sphere
    assert np.allclose(sim._ellipsoid_rcs(a, c, np.array([0.0])), np.pi * 0.3 ** 2)     # broadside
    assert np.allclose(sim._ellipsoid_rcs(a, c, np.array([1.0])), np.pi * 0.1 ** 4 / 0.3 ** 2)  # end-on


#################################################################################
#                                Radar physics                                  #
#################################################################################

def test_torso_doppler_line():
    """Torso Doppler is 2 v / lambda, and the spectrogram's strongest track follows the torso."""
    p = GaitParams()
    range_m = 20.0
    t = np.arange(int(6 * PRF)) / PRF
    fd = _torso_doppler(p, t, range_m)
    s_db, freqs, times = spectrogram_db(radar_return(p, t, range_m=range_m), n_frames=300)
    bin_hz = freqs[1] - freqs[0]
    assert abs(fd.mean() - 2 * p.speed() / WAVELENGTH) < bin_hz

    power = 10 ** (s_db / 10)
    track = np.interp(times, t, fd)
    rows = np.rint((track - freqs[0]) / bin_hz).astype(int)
    cols = np.arange(power.shape[1])
    # The per-frame spectral peak sits on the torso line for most frames...
    assert np.median(np.abs(freqs[power.argmax(0)] - track)) <= bin_hz
    # ...and a 3-bin band along the torso line holds more energy than the same band shifted anywhere else.
    energy = {k: sum(power[rows + k + j, cols].sum() for j in (-1, 0, 1)) for k in range(-30, 31)}
    assert max(energy, key=energy.get) == 0
    assert energy[0] > 1.5 * max(e for k, e in energy.items() if abs(k) >= 3)


def test_gait_cycle_shows_in_spectrogram():
    """Energy at high Doppler (the swinging legs) pulses once per step: period = half the gait cycle."""
    p = GaitParams(asymmetry=0.0)
    t = np.arange(int(10 * PRF)) / PRF
    s_db, freqs, times = spectrogram_db(radar_return(p, t, range_m=20.0), n_frames=500)
    band = (10 ** (s_db / 10))[freqs > 2 * 1.8 * p.speed() / WAVELENGTH].sum(0)
    band = (band - band.mean()) * np.hanning(band.size)
    rate = 1 / (times[1] - times[0])
    spectrum = np.abs(np.fft.rfft(band, n=8192))
    f = np.fft.rfftfreq(8192, 1 / rate)
    spectrum[f < 0.3] = 0                                          # ignore the slow range trend
    step_hz = 2 / p.cycle_duration()
    assert abs(f[spectrum.argmax()] - step_hz) < 0.1


def test_no_aliasing_for_any_user():
    """Every limb's Doppler stays below PRF / 2, for sampled users and for the extreme corner of the ranges."""
    t = np.arange(0, 3.0, 1 / 1000)
    users = [sample_user(np.random.default_rng([0, u])) for u in range(20)]
    users.append(GaitParams(height=1.95, rel_speed=1.65, cadence=1.1 * 1.03, hip_scale=1.15 * 1.05,
                            knee_scale=1.2 * 1.06, asymmetry=0.15, arm_swing=1.8 * 1.15))
    for p in users:
        vel = np.gradient(body_positions(p, t, speed_scale=1.07), t, axis=0)
        max_doppler = 2 * np.linalg.norm(vel, axis=-1).max() / WAVELENGTH    # |v| bounds the radial speed
        assert max_doppler < PRF / 2


def test_clutter_removed():
    """A static return (any complex constant) leaves the spectrogram unchanged."""
    p = GaitParams()
    x = radar_return(p, np.arange(5000) / PRF)
    assert np.allclose(spectrogram_db(x)[0], spectrogram_db(x + 0.5 - 0.3j)[0], atol=1e-6)


#################################################################################
#                                   Images                                      #
#################################################################################

def test_image_format_and_orientation():
    p = GaitParams()
    img = simulate_image(p, np.random.default_rng(0))
    assert img.shape == (256, 256, 3) and img.dtype == np.uint8
    assert simulate_image(p, np.random.default_rng(0), image_size=64).shape == (64, 64, 3)
    # Walking towards the radar: the energy is above the middle row (positive Doppler up).
    s_db, freqs, _ = spectrogram_db(radar_return(p, np.arange(6000) / PRF))
    level = render_image(s_db).astype(float).sum(-1)               # jet: dark blue = low, warm = high
    assert level[:128].sum() > level[128:].sum()
    assert s_db.max() == 0.0


def test_deterministic_and_users_differ():
    a = sample_user(np.random.default_rng([1, 1]))
    b = sample_user(np.random.default_rng([1, 2]))
    assert a == sample_user(np.random.default_rng([1, 1])) and a != b
    img = simulate_image(a, np.random.default_rng(5))
    assert img.tobytes() == simulate_image(a, np.random.default_rng(5)).tobytes()
    assert img.tobytes() != simulate_image(a, np.random.default_rng(6)).tobytes()
    assert img.tobytes() != simulate_image(b, np.random.default_rng(5)).tobytes()


def test_users_distinguishable_but_not_identical():
    """Nearest-centroid on time-averaged Doppler profiles beats chance clearly; images of a user still vary."""
    users, n_train, n_test, size = 4, 6, 4, 64
    feats = []
    for u in range(users):
        p = sample_user(np.random.default_rng([3, u]))
        for i in range(n_train + n_test):
            img = simulate_image(p, np.random.default_rng([3, u, i]), size).astype(float).mean(-1)
            feats.append(np.concatenate([img.mean(1), img.std(1)]))
    x = np.array(feats).reshape(users, n_train + n_test, -1)
    centroids = x[:, :n_train].mean(1)
    test = x[:, n_train:].reshape(users * n_test, -1)
    pred = ((test[:, None] - centroids[None]) ** 2).sum(-1).argmin(1)
    assert (pred == np.repeat(np.arange(users), n_test)).mean() >= 0.6         # chance is 0.25
    assert np.all(x[:, :n_train].std(1).mean(-1) > 0)


#################################################################################
#                                Dataset / CLI                                  #
#################################################################################

def test_write_dataset_layout(tmp_path):
    sim.write_dataset(tmp_path, num_users=2, train_per_user=3, val_per_user=1, seed=4, image_size=32, progress=False)
    for split, count in (("train", 3), ("val", 1)):
        assert sorted(p.name for p in (tmp_path / split).iterdir()) == ["ID_1", "ID_2"]
        for user in (1, 2):
            files = sorted((tmp_path / split / f"ID_{user}").iterdir())
            assert [f.name for f in files] == [f"ID_{user}_{i:04d}.png" for i in range(count)]
            with Image.open(files[0]) as im:
                assert im.size == (32, 32) and im.mode == "RGB"
    first = (tmp_path / "train" / "ID_1" / "ID_1_0000.png").read_bytes()
    sim.write_dataset(tmp_path / "again", 2, 3, 1, seed=4, image_size=32, progress=False)
    assert (tmp_path / "again" / "train" / "ID_1" / "ID_1_0000.png").read_bytes() == first


@pytest.mark.slow
def test_cli(tmp_path):
    out = tmp_path / "sim"
    result = subprocess.run(
        [sys.executable, "-m", "data.simulate", "--output_dir", str(out), "--num_users", "2",
         "--train_per_user", "2", "--val_per_user", "1", "--seed", "0", "--image_size", "32"],
        cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert len(result.stdout.strip().splitlines()) == 1 and "6 images" in result.stdout
    assert len(list(out.glob("train/ID_*/*.png"))) == 4 and len(list(out.glob("val/ID_*/*.png"))) == 2
    assert not list(out.rglob(".*"))                                # no temporary files left behind


@pytest.mark.parametrize("bad", [["--num_users", "0"], ["--train_per_user", "-1"]])
def test_cli_rejects_bad_counts(tmp_path, bad):
    args = ["--output_dir", str(tmp_path), "--num_users", "1", "--train_per_user", "1",
            "--val_per_user", "1", "--seed", "0"]
    with pytest.raises(SystemExit):
        sim.main(args + bad)


#################################################################################
#                         Looks: the broad family and the unseen one            #
#################################################################################

def test_carrier_scales_every_doppler():
    """The same walk at 77 GHz has its spectral peaks at 77/24 times the 24 GHz ones (Doppler = 2 v / lambda)."""
    p = GaitParams()

    def peak_hz(look: sim.RadarLook) -> float:
        t = np.arange(int(4 * look.prf)) / look.prf
        window = int(0.064 * look.prf)
        s_db, freqs, _ = spectrogram_db(radar_return(p, t, range_m=20.0, wavelength=look.wavelength),
                                        prf=look.prf, window=window, nfft=4 * window, n_frames=200)
        return float(np.median(freqs[s_db.argmax(0)]))

    low, high = peak_hz(sim.DEMO_LOOK), peak_hz(sim.RadarLook(carrier_hz=77e9, prf=8000.0))
    assert abs(high / low - 77 / 24) < 0.05 * 77 / 24


def test_broad_looks_vary_radar_and_rendering():
    looks = [sim.sample_look(np.random.default_rng(i)) for i in range(60)]
    assert len({lk.colormap for lk in looks}) >= 8 and len({lk.carrier_hz for lk in looks}) >= 4
    assert max(lk.dynamic_range_db for lk in looks) - min(lk.dynamic_range_db for lk in looks) > 20
    assert len({lk.window for lk in looks}) > 30 and len({lk.nfft for lk in looks}) >= 3
    # Unambiguous speeds span aliased feet (< 7.6 m/s) to a spare band.
    v_max = [lk.prf * lk.wavelength / 4 for lk in looks]
    assert min(v_max) < 5 and max(v_max) > 10
    rng = np.random.default_rng(0)
    image = simulate_image(sample_user(rng), rng, 64, looks[0])
    assert image.shape == (64, 64, 3) and image.dtype == np.uint8 and image.std() > 5


def test_broad_dataset_and_unseen_look_write_distinct_images(tmp_path):
    from data.unseen_look import PARULA_LIKE, write_unseen_dataset
    sim.write_dataset(tmp_path / "broad", 2, 2, 1, seed=3, image_size=64, looks="broad", progress=False)
    write_unseen_dataset(tmp_path / "unseen", 2, 2, 1, seed=3, image_size=64)
    broad = sorted((tmp_path / "broad").rglob("*.png"))
    unseen = sorted((tmp_path / "unseen").rglob("*.jpg"))
    assert len(broad) == len(unseen) == 6
    # The unseen renderer's background is the first colour of its own map, which no training map starts with.
    corner = np.asarray(Image.open(unseen[0]))[:8, :8].reshape(-1, 3).mean(0)
    assert np.abs(corner - np.array(PARULA_LIKE(0.0)[:3]) * 255).max() < 25
    starts = [np.array(colormaps[m](0.0)[:3]) * 255 for m in sim.TRAIN_COLORMAPS]
    assert min(np.abs(corner - s).max() for s in starts) > 25
