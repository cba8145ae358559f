"""Physics-based simulator of human micro-Doppler spectrograms (a walking person seen by a CW radar).

The body model is the Boulic-Thalmann gait model as used in V.C. Chen's human micro-Doppler
simulation: 16 ellipsoid point scatterers moved by joint-angle curves of normalised cycle time.
The radar is a 24 GHz CW radar sampled at PRF = 2.5 kHz (unambiguous +-1.25 kHz = +-7.8 m/s, above the
fastest foot of the fastest user, 7.6 m/s). A user is a fixed set of gait parameters; every image adds
jitter (start phase, speed, aspect, range, noise) so that users are distinguishable but not trivially.

    python -m data.simulate --output_dir D --num_users N --train_per_user M --val_per_user K --seed S
"""
import argparse
import os
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

import numpy as np
from matplotlib import colormaps
from PIL import Image

from common.progress import progress_bar

from common.io import atomic_path

C = 299_792_458.0
CARRIER_HZ = 24e9
WAVELENGTH = C / CARRIER_HZ          # 12.5 mm
PRF = 2500.0                         # Hz; Nyquist 1.25 kHz = 7.8 m/s radial
DURATION_S = 2.5                     # seconds of walking per image
WINDOW = 160                         # Hann window, 64 ms: resolves limb tracks, follows their accelerations
NFFT = 128                           # Doppler bins (19.5 Hz); rendered to the image size with bilinear
DYNAMIC_RANGE_DB = 45.0
NOISE_DB = (-62.0, -52.0)     # receiver noise power range (dB re. unit return), jittered per image

BODY_PARTS = (
    "head", "torso",
    "left_shoulder", "right_shoulder", "left_upper_arm", "right_upper_arm",
    "left_lower_arm", "right_lower_arm", "left_hip", "right_hip",
    "left_upper_leg", "right_upper_leg", "left_lower_leg", "right_lower_leg",
    "left_foot", "right_foot",
)

# Ellipsoid semi-axes per part as fractions of body height: (radius a = b, half-length c).
# Shoulders and hips are spheres (a = c). Anthropometry after Winter / Chen's walking-human code.
_SEMI_AXES = np.array([
    (0.055, 0.065), (0.085, 0.145),
    (0.030, 0.030), (0.030, 0.030), (0.026, 0.093), (0.026, 0.093),
    (0.020, 0.100), (0.020, 0.100), (0.035, 0.035), (0.035, 0.035),
    (0.040, 0.1225), (0.040, 0.1225), (0.030, 0.123), (0.030, 0.123),
    (0.025, 0.076), (0.025, 0.076),
])


#################################################################################
#                       Boulic-Thalmann joint-angle curves                      #
#################################################################################

def _fourier_fit(knots_t: list, knots_deg: list, harmonics: int = 6, table: int = 2048) -> np.ndarray:
    """A periodic piecewise-linear curve (knots of the published curve), low-passed to a few harmonics.

    Keeping a few harmonics gives a smooth curve with smooth derivatives, so limb velocities (hence
    Doppler) have no kinks from the knots. Returned as a fine lookup table (radians): interpolating it
    is ~10x cheaper than summing the harmonics for every pulse.
    """
    grid = np.arange(table) / table
    coef = np.fft.rfft(np.deg2rad(np.interp(grid, knots_t, knots_deg, period=1.0)))
    coef[harmonics + 1:] = 0
    return np.fft.irfft(coef, n=table)


def _curve(table: np.ndarray, cycles: np.ndarray) -> np.ndarray:
    """Evaluate a curve table (radians) at normalised cycle time (any real number, periodic in 1)."""
    return np.interp(cycles % 1.0, np.arange(table.size) / table.size, table, period=1.0)


# Normalised cycle time 0 = heel strike of this leg, toe-off near 0.6 (sagittal angles, degrees).
_HIP = _fourier_fit([0, .1, .2, .3, .4, .5, .6, .7, .8, .9], [28, 24, 14, 4, -5, -11, -6, 12, 26, 30])
_KNEE = _fourier_fit([0, .05, .15, .3, .4, .5, .6, .7, .78, .9, .96], [3, 10, 18, 9, 5, 14, 40, 62, 50, 16, 4])
_ANKLE = _fourier_fit([0, .07, .3, .45, .6, .65, .75, .9], [0, -6, 8, 12, -15, -18, -2, 2])
_HIP_MEAN = _HIP.mean()


#################################################################################
#                                    Users                                      #
#################################################################################

@dataclass
class GaitParams:
    """One person's gait: fixed for a user, jittered per image by `simulate_image`."""
    height: float = 1.75         # m
    rel_speed: float = 1.45      # RV = walking speed / leg length (Boulic-Thalmann)
    arm_swing: float = 1.0       # scale of shoulder / elbow flexion amplitude
    knee_scale: float = 1.0      # scale of knee flexion amplitude
    hip_scale: float = 1.0       # scale of hip flexion amplitude
    cadence: float = 1.0         # cadence factor: >1 = shorter, quicker steps at the same speed
    rcs_scale: float = 1.0       # overall reflectivity (clothing, build): sets SNR against noise
    girth: float = 1.0           # chest breadth scale: torso strength against the limbs
    asymmetry: float = 0.0       # left/right leg amplitude difference (fraction)

    @property
    def leg_length(self) -> float:
        """Ht: upper + lower leg, metres."""
        return 0.491 * self.height

    def speed(self, speed_scale: float = 1.0) -> float:
        """Walking speed, m/s."""
        return self.rel_speed * speed_scale * self.leg_length

    def cycle_duration(self, speed_scale: float = 1.0) -> float:
        """Gait cycle (two steps) in seconds: Boulic-Thalmann 1.346 / sqrt(RV), over the cadence factor."""
        return 1.346 / np.sqrt(self.rel_speed * speed_scale) / self.cadence


def sample_user(rng: np.random.Generator) -> GaitParams:
    """Draw one user's gait parameters (plausible adult walking, 0.85-1.6 m/s)."""
    return GaitParams(
        height=float(rng.uniform(1.55, 1.95)),
        rel_speed=float(rng.uniform(1.1, 1.65)),
        arm_swing=float(rng.uniform(0.5, 1.8)),
        knee_scale=float(rng.uniform(0.8, 1.2)),
        hip_scale=float(rng.uniform(0.85, 1.15)),
        cadence=float(rng.uniform(0.9, 1.1)),
        rcs_scale=float(rng.uniform(0.6, 1.5)),
        girth=float(rng.uniform(0.85, 1.2)),
        asymmetry=float(rng.uniform(0.0, 0.15)),
    )


#################################################################################
#                                 Body model                                    #
#################################################################################

def _sagittal(angle: np.ndarray) -> np.ndarray:
    """Unit vector hanging down from a joint, swung forward by `angle` (rad): (sin, 0, -cos)."""
    return np.stack([np.sin(angle), np.zeros_like(angle), -np.cos(angle)], axis=-1)


def _rot_z(vec: np.ndarray, psi: np.ndarray) -> np.ndarray:
    """Rotate constant body-frame offsets (3,) about the vertical by angles psi (T,) -> (T, 3)."""
    c, s = np.cos(psi), np.sin(psi)
    return np.stack([c * vec[0] - s * vec[1], s * vec[0] + c * vec[1], np.full_like(psi, vec[2])], axis=-1)


def _skeleton(p: GaitParams, t: np.ndarray, phase: float = 0.0,
              speed_scale: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """Segment centres and unit axes, both (T, 16, 3), in the walking frame (x forward, y left, z up)."""
    H, Ht = p.height, p.leg_length
    rv, v, dc = p.rel_speed * speed_scale, p.speed(speed_scale), p.cycle_duration(speed_scale)
    cyc = phase + t / dc
    w = 2 * np.pi

    # Trunk translations (Boulic-Thalmann, in units of Ht): vertical bob and forward surge at twice
    # the cycle rate (once per step), lateral sway once per cycle.
    av = 0.015 * rv
    ds = 0.752 * dc - 0.143                                # support duration
    vert = Ht * (-av + av * np.sin(w * (2 * cyc - 0.35)))
    lat = Ht * -0.032 * np.sin(w * (cyc - 0.1))
    fwd = Ht * -0.021 * np.sin(w * (2 * cyc + 2 * (0.625 - ds / dc)))
    pelvis = np.stack([v * t + fwd, lat, 0.53 * H + vert], axis=-1)

    # Pelvis rotation brings the forward leg's hip forward; thorax torsion counter-rotates the shoulders.
    pelvis_rot = np.deg2rad(4.0 * rv) * np.cos(w * cyc)
    thorax_rot = -np.deg2rad(4.0 * rv) * np.cos(w * cyc)
    pelvis_list = np.deg2rad(3.0) * np.sin(w * cyc)       # swing-side hip drops
    hip_w, sh_w = 0.095 * H, 0.11 * H
    neck = pelvis + np.array([0.0, 0.0, 0.288 * H])       # shoulder level, 0.818 H
    head = pelvis + np.array([0.0, 0.0, 0.405 * H])       # head centre, 0.935 H

    g = (rv / 1.45) ** 0.3                                 # joint amplitudes grow slowly with speed
    arm_amp = 9.88 * rv * p.arm_swing                      # Boulic shoulder-flexion amplitude, deg
    centres, axes = {}, {}
    for side, sign, shift, amp in (("right", -1.0, 0.0, 1 + p.asymmetry / 2),
                                   ("left", 1.0, 0.5, 1 - p.asymmetry / 2)):
        c = cyc + shift                                    # this leg's heel strike at c = 0
        hip = pelvis + _rot_z(np.array([0.0, sign * hip_w, 0.0]), pelvis_rot)
        hip[:, 2] += sign * hip_w * np.sin(pelvis_list)
        hf = _HIP_MEAN + p.hip_scale * amp * g * (_curve(_HIP, c) - _HIP_MEAN)
        kf = p.knee_scale * amp * g * _curve(_KNEE, c)
        shank = hf - kf
        foot_ang = shank + g * _curve(_ANKLE, c)
        thigh_ax, shank_ax = _sagittal(hf), _sagittal(shank)
        foot_ax = np.stack([np.cos(foot_ang), np.zeros_like(foot_ang), np.sin(foot_ang)], axis=-1)
        knee = hip + 0.245 * H * thigh_ax
        ankle = knee + 0.246 * H * shank_ax

        # Arms swing opposite to the same-side leg: right arm is back at right heel strike.
        sf = np.deg2rad(3 - arm_amp / 2 - arm_amp * np.cos(w * c))
        ef = np.deg2rad(8 + 0.8 * arm_amp * (0.5 - 0.5 * np.cos(w * c)))
        shoulder = neck + _rot_z(np.array([0.0, sign * sh_w, 0.0]), thorax_rot)
        upper_ax, lower_ax = _sagittal(sf), _sagittal(sf + ef)
        elbow = shoulder + 0.186 * H * upper_ax

        centres.update({f"{side}_shoulder": shoulder, f"{side}_upper_arm": shoulder + 0.093 * H * upper_ax,
                        f"{side}_lower_arm": elbow + 0.1 * H * lower_ax, f"{side}_hip": hip,
                        f"{side}_upper_leg": hip + 0.1225 * H * thigh_ax,
                        f"{side}_lower_leg": knee + 0.123 * H * shank_ax,
                        f"{side}_foot": ankle + 0.05 * H * foot_ax})
        lateral = np.broadcast_to([0.0, 1.0, 0.0], hip.shape)      # spheres: any axis will do
        axes.update({f"{side}_shoulder": lateral, f"{side}_hip": lateral, f"{side}_upper_arm": upper_ax,
                     f"{side}_lower_arm": lower_ax, f"{side}_upper_leg": thigh_ax,
                     f"{side}_lower_leg": shank_ax, f"{side}_foot": foot_ax})
    centres["head"], centres["torso"] = head, (pelvis + neck) / 2
    vertical = np.broadcast_to([0.0, 0.0, 1.0], pelvis.shape)
    axes["head"], axes["torso"] = vertical, vertical
    return (np.stack([centres[k] for k in BODY_PARTS], axis=1),
            np.stack([axes[k] for k in BODY_PARTS], axis=1))


def body_positions(params: GaitParams, t: np.ndarray, phase: float = 0.0,
                   speed_scale: float = 1.0) -> np.ndarray:
    """Scatterer (segment-centre) positions, (len(t), 16, 3) metres, walking along +x from x = 0."""
    return _skeleton(params, np.asarray(t, dtype=np.float64), phase, speed_scale)[0]


#################################################################################
#                              Radar and spectrogram                            #
#################################################################################

def _ellipsoid_rcs(a: np.ndarray, c: np.ndarray, cos_theta: np.ndarray) -> np.ndarray:
    """Backscatter RCS of a spheroid (a = b) seen at angle theta from its c axis (Chen / Trott formula)."""
    cos2 = cos_theta ** 2
    return np.pi * a ** 4 * c ** 2 / (a ** 2 * (1 - cos2) + c ** 2 * cos2) ** 2


def radar_return(params: GaitParams, t: np.ndarray, phase: float = 0.0, speed_scale: float = 1.0,
                 aspect_deg: float = 0.0, range_m: float = 7.0, radar_height: float = 1.0,
                 wavelength: float = WAVELENGTH) -> np.ndarray:
    """Complex baseband CW return sum_k sqrt(sigma_k) / R_k^2 exp(-j 4 pi R_k / lambda), shape (len(t),).

    The person starts `range_m` from the radar (at the origin, `radar_height` up) and walks towards
    it, the walking direction turned `aspect_deg` off the line of sight: approach = positive Doppler.
    """
    pos, ax = _skeleton(params, np.asarray(t, dtype=np.float64), phase, speed_scale)
    heading = np.pi + np.deg2rad(aspect_deg)
    ch, sh = np.cos(heading), np.sin(heading)
    world = np.stack([range_m + ch * pos[..., 0] - sh * pos[..., 1],
                      sh * pos[..., 0] + ch * pos[..., 1], pos[..., 2] - radar_height], axis=-1)
    world_ax = np.stack([ch * ax[..., 0] - sh * ax[..., 1], sh * ax[..., 0] + ch * ax[..., 1], ax[..., 2]], axis=-1)
    rng_k = np.linalg.norm(world, axis=-1)                 # (T, 16)
    cos_theta = np.einsum("tki,tki->tk", world, world_ax) / rng_k
    semi = _SEMI_AXES * params.height
    sigma = params.rcs_scale * _ellipsoid_rcs(semi[:, 0], semi[:, 1], cos_theta)
    # A broader chest: the torso's lateral semi-axis b grows, and a triaxial ellipsoid seen along its
    # a axis has sigma = pi b^2 c^2 / a^2, so its RCS grows as b^2.
    sigma[:, BODY_PARTS.index("torso")] *= params.girth ** 2
    amp = np.sqrt(sigma) / rng_k ** 2
    return np.sum(amp * np.exp(-4j * np.pi / wavelength * rng_k), axis=1)


def spectrogram_db(x: np.ndarray, prf: float = PRF, window: int = WINDOW, nfft: int = NFFT,
                   n_frames: int = NFFT) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Clutter-removed Hann-window STFT in dB, max = 0. Returns (S (nfft, n_frames), Doppler Hz, frame times).

    Rows run from -prf/2 up to +prf/2 (zero Doppler at row nfft // 2); frames are spread evenly over
    the signal (hop ~ 24 samples here, 85% overlap), so any duration gives exactly n_frames columns.
    """
    x = x - x.mean()                                       # clutter removal: static returns sit at DC
    starts = np.linspace(0, x.size - window, n_frames).round().astype(int)
    frames = x[starts[:, None] + np.arange(window)] * np.hanning(window)
    spec = np.fft.fftshift(np.fft.fft(frames, n=nfft, axis=1), axes=1)
    power = np.abs(spec.T) ** 2
    s_db = 10 * np.log10(power + 1e-30)
    freqs = np.fft.fftshift(np.fft.fftfreq(nfft, 1 / prf))
    return s_db - s_db.max(), freqs, (starts + window / 2) / prf


def render_image(s_db: np.ndarray, image_size: int = 256, dynamic_range_db: float = DYNAMIC_RANGE_DB,
                 colormap: str = "jet") -> np.ndarray:
    """Colour-mapped (image_size, image_size, 3) uint8 image: time left to right, positive Doppler up."""
    level = (np.clip(s_db, -dynamic_range_db, 0.0) + dynamic_range_db) / dynamic_range_db
    level = level[::-1].astype(np.float32)                 # row 0 = highest Doppler
    if level.shape != (image_size, image_size):
        level = np.asarray(Image.fromarray(level, mode="F").resize((image_size, image_size), Image.BILINEAR))
    rgb = colormaps[colormap](np.clip(level, 0.0, 1.0))[..., :3]
    return (rgb * 255 + 0.5).astype(np.uint8)


#################################################################################
#                                Whole images                                   #
#################################################################################

@dataclass(frozen=True)
class RadarLook:
    """How a radar and its processing make a walk into an image: everything but the person.

    The demo uses one look (DEMO_LOOK); `sample_look` draws from a broad family of them so that a
    tokenizer trained on the family meets spectrograms of other radars and renderers prepared.
    """
    carrier_hz: float = CARRIER_HZ
    prf: float = PRF
    duration_s: float = DURATION_S
    window: int = WINDOW
    nfft: int = NFFT
    n_frames: int = NFFT
    dynamic_range_db: float = DYNAMIC_RANGE_DB
    noise_db: tuple[float, float] = NOISE_DB
    speed_scale: tuple[float, float] = (0.93, 1.07)      # per-image walking-speed jitter
    colormap: str = "jet"

    @property
    def wavelength(self) -> float:
        return C / self.carrier_hz


DEMO_LOOK = RadarLook()
# Colour maps of the broad family; "parula"-like maps and others stay out, for the unseen-look test.
TRAIN_COLORMAPS = ("jet", "turbo", "viridis", "plasma", "inferno", "magma", "hot", "gray", "bone",
                   "cividis", "gist_heat", "rainbow", "coolwarm", "Blues_r")


def sample_look(rng: np.random.Generator) -> RadarLook:
    """A random radar and rendering: K- to E-band carriers, unambiguous speed 3.5-12 m/s (fast feet may
    alias), 25-150 ms windows, 1.5-4 s per image, 30-65 dB shown, noise from clean to strong, many maps."""
    carrier = float(rng.choice([5.8e9, 10e9, 24e9, 35e9, 60e9, 77e9]))
    v_unambiguous = rng.uniform(3.5, 12.0)                 # PRF/2 = 2 v / lambda
    prf = 4 * v_unambiguous / (C / carrier)
    window = max(16, int(round(rng.uniform(0.025, 0.15) * prf)))
    nfft = int(2 ** np.ceil(np.log2(window * rng.uniform(0.8, 2.0))))
    noise_centre = rng.uniform(-75.0, -40.0)
    slow = rng.uniform(0.75, 1.0)
    return RadarLook(carrier_hz=carrier, prf=float(prf), duration_s=float(rng.uniform(1.5, 4.0)), window=window,
                     nfft=min(nfft, 1024), n_frames=int(rng.choice([128, 192, 256])),
                     dynamic_range_db=float(rng.uniform(30.0, 65.0)),
                     noise_db=(noise_centre - 5.0, noise_centre + 5.0),
                     speed_scale=(slow, slow * rng.uniform(1.05, 1.45)),
                     colormap=str(rng.choice(TRAIN_COLORMAPS)))


def simulated_walk(params: GaitParams, rng: np.random.Generator, look: RadarLook = DEMO_LOOK) -> np.ndarray:
    """The complex radar return of one walk of `params` (per-walk jitter drawn from `rng`), noise included."""
    # A person never walks twice the same way: small walk-to-walk changes of the gait itself.
    params = replace(params, arm_swing=params.arm_swing * rng.uniform(0.85, 1.15),
                     knee_scale=params.knee_scale * rng.uniform(0.94, 1.06),
                     hip_scale=params.hip_scale * rng.uniform(0.95, 1.05),
                     cadence=params.cadence * rng.uniform(0.97, 1.03))
    t = np.arange(int(look.duration_s * look.prf)) / look.prf
    x = radar_return(params, t, phase=rng.uniform(0, 1), speed_scale=rng.uniform(*look.speed_scale),
                     aspect_deg=rng.uniform(-25, 25), range_m=rng.uniform(5.0, 9.0),
                     radar_height=rng.uniform(0.8, 1.3), wavelength=look.wavelength)
    # Static clutter (removed by the mean subtraction) and receiver noise at a jittered level.
    x = x + 0.02 * np.exp(2j * np.pi * rng.uniform())
    noise_std = 10 ** (rng.uniform(*look.noise_db) / 20)
    return x + noise_std / np.sqrt(2) * (rng.standard_normal(x.size) + 1j * rng.standard_normal(x.size))


def simulate_image(params: GaitParams, rng: np.random.Generator, image_size: int = 256,
                   look: RadarLook = DEMO_LOOK) -> np.ndarray:
    """One spectrogram image of `params` walking, with per-image jitter drawn from `rng`."""
    s_db = spectrogram_db(simulated_walk(params, rng, look), prf=look.prf, window=look.window, nfft=look.nfft,
                          n_frames=look.n_frames)[0]
    return render_image(s_db, image_size, look.dynamic_range_db, look.colormap)


def write_people(output_dir: str | os.PathLike, num_users: int, train_per_user: int, val_per_user: int, seed: int,
                 make_image: Callable[[GaitParams, np.random.Generator], Image.Image], extension: str = "png",
                 desc: str = "simulating", progress: bool = True, **save_options) -> None:
    """Write output_dir/{train,val}/ID_n/ID_n_0007.<extension> (n from 1), one `make_image(person, rng)` each.

    Person n is drawn from seed (seed, n), each image's jitter from (seed, n, split, index): deterministic,
    and the same people whatever the renderer.
    """
    root = Path(output_dir)
    with progress_bar(total=num_users * (train_per_user + val_per_user), desc=desc, unit="img",
                      disable=not progress) as bar:
        for user in range(1, num_users + 1):
            params = sample_user(np.random.default_rng([seed, user]))
            for split_id, (split, count) in enumerate((("train", train_per_user), ("val", val_per_user))):
                folder = root / split / f"ID_{user}"
                folder.mkdir(parents=True, exist_ok=True)
                for index in range(count):
                    image = make_image(params, np.random.default_rng([seed, user, split_id, index]))
                    with atomic_path(folder / f"ID_{user}_{index:04d}.{extension}") as tmp:
                        image.save(tmp, format="JPEG" if extension == "jpg" else extension.upper(), **save_options)
                    bar.update(1)


def write_dataset(output_dir: str | os.PathLike, num_users: int, train_per_user: int, val_per_user: int,
                  seed: int, image_size: int = 256, looks: str = "demo", progress: bool = True) -> None:
    """Simulated PNGs; looks="demo": every image in DEMO_LOOK, "broad": each in its own random `sample_look`."""
    if looks not in ("demo", "broad"):
        raise ValueError(f"looks must be 'demo' or 'broad' (got {looks!r})")

    def make_image(params: GaitParams, rng: np.random.Generator) -> Image.Image:
        look = sample_look(rng) if looks == "broad" else DEMO_LOOK
        return Image.fromarray(simulate_image(params, rng, image_size, look))

    write_people(output_dir, num_users, train_per_user, val_per_user, seed, make_image, progress=progress)


def dataset_parser(description: str) -> argparse.ArgumentParser:
    """The command line shared by the simulators: where, how many people and images, which seed, what size."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--num_users", type=int, required=True)
    parser.add_argument("--train_per_user", type=int, required=True)
    parser.add_argument("--val_per_user", type=int, required=True)
    parser.add_argument("--seed", type=int, required=True)
    parser.add_argument("--image_size", type=int, default=256)
    return parser


def main(argv: list[str] | None = None) -> None:
    parser = dataset_parser("Simulate a per-user radar micro-Doppler dataset (walking people).")
    parser.add_argument("--looks", choices=["demo", "broad"], default="demo",
                        help="demo: the demo's radar and rendering; broad: a random radar and rendering per image")
    args = parser.parse_args(argv)
    for name in ("num_users", "train_per_user", "val_per_user", "image_size"):
        if getattr(args, name) < (1 if name in ("num_users", "image_size") else 0):
            parser.error(f"--{name} must be positive")
    start = time.time()
    write_dataset(args.output_dir, args.num_users, args.train_per_user, args.val_per_user, args.seed, args.image_size,
                  args.looks)
    n = args.num_users * (args.train_per_user + args.val_per_user)
    print(f"wrote {n} images ({args.num_users} users x {args.train_per_user} train + {args.val_per_user} val, "
          f"{args.image_size}px, seed {args.seed}) to {args.output_dir} in {time.time() - start:.1f}s")


if __name__ == "__main__":
    main()
