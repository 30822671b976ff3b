"""Generated test videos: real H.264 `.mp4` files whose classes differ only in the temporal order of events.

Used by the tests, the benchmarks and `vtn demo`. Every class shows the same things; only their order
in time tells the classes apart: in the first half a blob crosses the frame left-to-right or right-to-left,
in the second half a red flash is followed by a green one or the reverse. Sampled evenly, every class gives
the same set of frames, so a model that mean-pools frame features cannot separate the four classes (it is
at chance, 25 %) and a temporal model must use the order.
Lengths, frame rates (constant 15/24/25/30 fps, and a variable-frame-rate variant) and frame sizes vary
from video to video so the extraction path sees the variety real data has. Frames are small and clips
short, so a whole dataset encodes in seconds.

`make_bad_files` writes the broken inputs extraction must record as failures instead of crashing on.
"""

from __future__ import annotations

import fractions
import itertools
import json
import math
import struct
from pathlib import Path

import numpy as np

# Every class shows the same two events, a blob crossing then two flashes; only their direction and order differ.
CLASS_EVENTS = {
    "left_to_right_red_first": ("left_to_right", "red"),
    "left_to_right_green_first": ("left_to_right", "green"),
    "right_to_left_red_first": ("right_to_left", "red"),
    "right_to_left_green_first": ("right_to_left", "green"),
}
CLASSES = tuple(CLASS_EVENTS)
COLOURS = ((255.0, 40.0, 40.0), (40.0, 255.0, 40.0))  # red, green
SIZES = ((64, 64), (96, 64), (128, 96), (112, 80))  # (width, height); even, as yuv420p needs
FPS_CHOICES = (15, 24, 25, 30)
# Variable-frame-rate videos use a millisecond time base and irregular frame spacing.
VFR_TIME_BASE = fractions.Fraction(1, 1000)


def render_frame(cls: str, t: float, duration: float, width: int, height: int, background: np.ndarray) -> np.ndarray:
    """One RGB frame [height, width, 3] uint8 of class `cls` at time `t` seconds of a `duration`-second clip.

    First half: a white blob crosses the frame (left to right or right to left). Second half: two flashes
    in the centre, each peaking mid-quarter (red then green, or green then red).
    """
    direction, first = CLASS_EVENTS[cls]
    u = min(max(t / duration, 0.0), 1.0)  # progress through the clip, 0..1
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    radius = 0.12 * min(width, height)
    if u < 0.5:
        v = 2 * u  # progress through the crossing
        x = (0.15 + 0.7 * v) * width if direction == "left_to_right" else (0.85 - 0.7 * v) * width
        blob = np.exp(-((xx - x) ** 2 + (yy - height / 2) ** 2) / (2 * radius**2))
        colour = np.array([255.0, 255.0, 255.0], dtype=np.float32)
    else:
        w = 2 * u - 1  # progress through the flashes
        order = COLOURS if first == "red" else COLOURS[::-1]
        colour = np.array(order[0] if w < 0.5 else order[1], dtype=np.float32)
        strength = math.sin(math.pi * ((2 * w) % 1.0))
        blob = strength * np.exp(-((xx - width / 2) ** 2 + (yy - height / 2) ** 2) / (2 * (1.5 * radius) ** 2))
    out = background.astype(np.float32) * (1 - blob[..., None]) + colour * blob[..., None]
    return np.clip(out, 0, 255).astype(np.uint8)


def frame_times(duration: float, fps: float, vfr: bool, rng: np.random.Generator) -> list[float]:
    """Presentation times (seconds) of the frames: regular at `fps`, or irregular around it when `vfr`."""
    if not vfr:
        return [i / fps for i in range(max(1, int(round(duration * fps))))]
    times, t = [], 0.0
    while t < duration:
        times.append(round(t, 3))  # whole milliseconds, exactly representable in the 1/1000 time base
        t += rng.uniform(0.4, 1.6) / fps
    return times


def write_video(path: str | Path, frames, times: list[float], fps: float, vfr: bool = False, crf: int = 23) -> Path:
    """Encode `frames` (an iterable of [H, W, 3] uint8 arrays, one per entry of `times`) as H.264 in `path`.

    Constant-rate videos use the time base 1/fps; variable-rate ones a 1/1000 s time base with each frame's
    own timestamp, so their container records the irregular spacing and readers must use real timestamps.
    """
    import av

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    frames = iter(frames)
    first = next(frames)
    height, width = first.shape[:2]
    with av.open(str(path), "w") as container:
        rate = fractions.Fraction(fps).limit_denominator(1001)
        stream = container.add_stream("libx264", rate=rate)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        if vfr:
            # The encoder works in its own time base; give it the millisecond one so irregular pts survive.
            stream.time_base = stream.codec_context.time_base = VFR_TIME_BASE
        time_base = VFR_TIME_BASE if vfr else 1 / rate
        stream.options = {"crf": str(crf), "preset": "ultrafast", "tune": "zerolatency"}
        for i, (t, image) in enumerate(zip(times, _chain(first, frames))):
            frame = av.VideoFrame.from_ndarray(image, format="rgb24")
            frame.pts = int(round(t / time_base)) if vfr else i
            frame.time_base = time_base
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))
    return path


def _chain(first, rest):
    yield first
    yield from rest


def make_video(path: str | Path, cls: str, seconds: float, fps: float, size: tuple[int, int], vfr: bool = False, seed: int = 0) -> Path:
    """Write one generated video of class `cls`; the background (colour and texture) comes from `seed`."""
    rng = np.random.default_rng(seed)
    width, height = size
    # A dim random colour plus fixed texture: it varies between videos but never within one,
    # so it carries no information about the class.
    base = rng.uniform(0, 90, size=3)
    texture = rng.normal(0, 12, size=(height, width, 1))
    background = np.clip(base + texture, 0, 255).astype(np.uint8)
    times = frame_times(seconds, fps, vfr, rng)
    frames = (render_frame(cls, t, seconds, width, height, background) for t in times)
    return write_video(path, frames, times, fps, vfr=vfr)


def make_dataset(
    root: str | Path,
    per_split: dict[str, int] | None = None,
    classes: tuple[str, ...] = CLASSES,
    seconds: tuple[float, float] = (1.5, 3.0),
    vfr_every: int = 4,
    seed: int = 0,
    fps: tuple[float, ...] = FPS_CHOICES,
) -> list[Path]:
    """Write `root/split/class/NNNN.mp4` for every split, `per_split[split]` videos per class.

    Lengths are drawn from `seconds`, frame rates from `fps` (15/24/25/30), sizes from `SIZES`; every
    `vfr_every`-th video (0 = none) has a variable frame rate. Deterministic for a given seed.
    Returns the paths written, in a fixed order.
    """
    per_split = per_split if per_split is not None else {"train": 8, "val": 4}
    rng = np.random.default_rng(seed)
    paths, n = [], 0
    for split, count in per_split.items():
        for cls in classes:
            for i in range(count):
                vfr = vfr_every > 0 and n % vfr_every == vfr_every - 1
                path = Path(root) / split / cls / f"{i:04d}.mp4"
                paths.append(make_video(
                    path, cls,
                    seconds=float(rng.uniform(*seconds)),
                    fps=float(fps[rng.integers(len(fps))]),
                    size=SIZES[rng.integers(len(SIZES))],
                    vfr=vfr,
                    seed=int(rng.integers(2**31)),
                ))
                n += 1
    return paths


# The layout kind (`make_layout_dataset`): every class shows the same two textured squares, one striped
# horizontally and one vertically, in the same colour, moving together; only where they sit relative to each other
# (side by side or one above the other, and which is first) tells the classes apart.
LAYOUT_CLASSES = ("horizontal_left", "vertical_left", "horizontal_above", "vertical_above")
LAYOUT_SIZE = 72  # square frames; a 64 px backbone input (resize to 73, centre crop) sees them at about 1:1
LAYOUT_PATCH = 12  # side of each textured square, px: 3 stripes of period 4
LAYOUT_DISTANCE = 26  # between the squares' centres, px: a 14 px gap, wider than the local features of a
# random-init ResNet stem, so no local feature sees both squares (see `render_layout_frame`)


def render_layout_frame(cls: str, t: float, duration: float, background: np.ndarray, colour: np.ndarray,
                        phase: int, start: tuple[float, float], drift: tuple[float, float]) -> np.ndarray:
    """One RGB frame [72, 72, 3] uint8 of layout class `cls` at time `t` of a `duration`-second clip.

    Two squares of stripes (period 4 px, phase `phase`, `colour` on the background's own colour) whose centres
    are `LAYOUT_DISTANCE` apart, side by side or one above the other, the horizontally striped one first or
    second; the pair's centre moves from `start` by `drift` (px) over the clip. Every class has the same local
    content (two identical squares, the same edges, the same colours) in different places, so a backbone whose
    pooled feature averages local features over the frame (a random-init ResNet, whose residual branches start
    at zero, is one) gives the classes the same feature; a trained one can learn where the squares are.
    """
    first, axis = cls.split("_")  # "horizontal"/"vertical", "left"/"above"
    u = min(max(t / duration, 0.0), 1.0)
    cx, cy = start[0] + drift[0] * u, start[1] + drift[1] * u
    out = background.astype(np.float32).copy()
    base = background.astype(np.float32).mean(axis=(0, 1))
    stripes = (np.sin(2 * np.pi * (np.arange(LAYOUT_PATCH) + phase + 0.5) / 4) > 0).astype(np.float32)
    squares = {"horizontal": np.tile(stripes[:, None], (1, LAYOUT_PATCH)),  # stripes along x: rows alternate
               "vertical": np.tile(stripes[None, :], (LAYOUT_PATCH, 1))}
    order = (first, "vertical" if first == "horizontal" else "horizontal")
    for kind, sign in zip(order, (-1, 1)):
        x = cx + (sign * LAYOUT_DISTANCE / 2 if axis == "left" else 0.0)
        y = cy + (sign * LAYOUT_DISTANCE / 2 if axis == "above" else 0.0)
        x0, y0 = int(round(x - LAYOUT_PATCH / 2)), int(round(y - LAYOUT_PATCH / 2))
        m = squares[kind][..., None]  # [p, p, 1]: 1 on a stripe
        out[y0:y0 + LAYOUT_PATCH, x0:x0 + LAYOUT_PATCH] = m * colour + (1 - m) * base
    return np.clip(out, 0, 255).astype(np.uint8)


def make_layout_video(path: str | Path, cls: str, seconds: float, fps: float, seed: int = 0) -> Path:
    """Write one layout video of class `cls` (see `render_layout_frame`); background, stripe colour and phase,
    the pair's start and its drift come from `seed`, identically distributed for every class. Encoded at a low
    crf so the 4 px stripes survive."""
    rng = np.random.default_rng(seed)
    size = LAYOUT_SIZE
    base = rng.uniform(0, 90, size=3)
    background = np.clip(base + rng.normal(0, 12, size=(size, size, 1)), 0, 255).astype(np.uint8)
    colour = rng.uniform(140, 255, size=3).astype(np.float32)
    phase = int(rng.integers(4))
    start = tuple(size / 2 + rng.uniform(-2, 2, size=2))
    drift = tuple(rng.uniform(-3, 3, size=2))
    times = frame_times(seconds, fps, False, rng)
    frames = (render_layout_frame(cls, t, seconds, background, colour, phase, start, drift) for t in times)
    return write_video(path, frames, times, fps, crf=12)


def make_layout_dataset(root: str | Path, per_split: dict[str, int] | None = None,
                        classes: tuple[str, ...] = LAYOUT_CLASSES, seconds: tuple[float, float] = (1.0, 2.0),
                        fps: float = 15.0, seed: int = 0) -> list[Path]:
    """Write `root/split/class/NNNN.mp4` layout videos, `per_split[split]` per class (default 8 train, 4 val):
    classes a frozen random-init backbone's pooled features cannot tell apart and a fine-tuned one can (used by
    `vtn demo --finetune`). Constant `fps`, lengths drawn from `seconds`; deterministic for a given seed."""
    per_split = per_split if per_split is not None else {"train": 8, "val": 4}
    rng = np.random.default_rng(seed)
    paths = []
    for split, count in per_split.items():
        for cls in classes:
            for i in range(count):
                paths.append(make_layout_video(Path(root) / split / cls / f"{i:04d}.mp4", cls,
                                               seconds=float(rng.uniform(*seconds)), fps=fps,
                                               seed=int(rng.integers(2**31))))
    return paths


# The order kind (`make_order_dataset`), for long videos: a class is the order of three short coloured events (red,
# green, blue: 2 s each, back to back) at a random place in a long video whose other frames are an uninformative
# background. Every class shows the same three colours; only their order tells the six classes apart.
ORDER_COLOURS = {"red": (230.0, 30.0, 30.0), "green": (30.0, 230.0, 30.0), "blue": (30.0, 30.0, 230.0)}
ORDER_CLASSES = tuple("_".join(p) for p in itertools.permutations(ORDER_COLOURS))
ORDER_SIZE = 32  # square frames: enough for a colour, cheap to encode and to extract


def order_plan(rng: np.random.Generator, seconds: float, event: float) -> tuple[np.ndarray, float, float]:
    """(background [size, size, 3] float, the first event's start, each event's length) of an order video."""
    background = np.clip(rng.uniform(0, 70, size=3) + rng.normal(0, 12, size=(ORDER_SIZE, ORDER_SIZE, 1)), 0, 255)
    event = min(event, seconds / 3)
    return background, float(rng.uniform(0, max(0.0, seconds - 3 * event))), event  # seconds/3*3 may round below


def order_events(seconds: float, seed: int, event: float = 2.0) -> tuple[float, float]:
    """(start, end) in seconds of the three events of `make_order_video(..., seconds, event=event, seed=seed)`:
    the frames that decide its class (for measuring where a model looks)."""
    _, start, event = order_plan(np.random.default_rng(seed), seconds, event)
    return start, start + 3 * event


def make_order_video(path: str | Path, cls: str, seconds: float, fps: float = 25.0, event: float = 2.0,
                     seed: int = 0) -> Path:
    """Write one order video of class `cls` (three colour names joined by "_"): `seconds` long at `fps`, the three
    events (`event` seconds each, shortened to a third of a shorter video) back to back from a random start; the
    background (a dim colour and texture) and the place of the events come from `seed`."""
    rng = np.random.default_rng(seed)
    size = ORDER_SIZE
    background, start, event = order_plan(rng, seconds, event)
    # each event fills the frame's centre with its colour over the background's texture
    yy, xx = np.mgrid[0:size, 0:size]
    blob = (np.exp(-((xx - size / 2) ** 2 + (yy - size / 2) ** 2) / (2 * (0.35 * size) ** 2)))[..., None]
    looks = {c: np.clip(background * (1 - blob) + np.array(rgb) * blob, 0, 255).astype(np.uint8)
             for c, rgb in ORDER_COLOURS.items()}
    plain = background.astype(np.uint8)
    order = cls.split("_")
    times = frame_times(seconds, fps, False, rng)

    def frame(t: float) -> np.ndarray:
        k = int((t - start) // event)
        return looks[order[k]] if t >= start and k < 3 else plain

    return write_video(path, (frame(t) for t in times), times, fps)


def make_order_dataset(root: str | Path, per_split: dict[str, int] | None = None,
                       seconds: dict[str, tuple[float, float]] | None = None, fps: float = 25.0,
                       seed: int = 0) -> list[Path]:
    """Write `root/split/class/NNNN.mp4` order videos, `per_split[split]` per class (default 12 train, 4 val), each
    split's lengths drawn from `seconds[split]` (default 3-60 s for every split); deterministic for a given seed.
    `root/events.json` gives each video's (start, end) of its events in seconds, by path relative to `root`."""
    per_split = per_split if per_split is not None else {"train": 12, "val": 4}
    rng = np.random.default_rng(seed)
    paths, events = [], {}
    for split, count in per_split.items():
        lo, hi = (seconds or {}).get(split, (3.0, 60.0))
        for cls in ORDER_CLASSES:
            for i in range(count):
                name, length = f"{split}/{cls}/{i:04d}.mp4", float(rng.uniform(lo, hi))
                video_seed = int(rng.integers(2**31))
                paths.append(make_order_video(Path(root) / name, cls, seconds=length, fps=fps, seed=video_seed))
                events[name] = order_events(length, video_seed)
    (Path(root) / "events.json").write_text(json.dumps(events, indent=1) + "\n")
    return paths


def make_long_video(path: str | Path, seconds: float, width: int = 1920, height: int = 1080, fps: float = 10.0) -> Path:
    """A long, large video (e.g. 3 minutes of 1080p) for memory benchmarks: a blob crossing the frame every 10 s.

    Frames are cheap to render (one moving square over a fixed background), so the encode dominates.
    """
    rng = np.random.default_rng(0)
    background = np.clip(rng.normal(60, 20, size=(height, width, 3)), 0, 255).astype(np.uint8)
    times = [i / fps for i in range(int(round(seconds * fps)))]

    def frames():
        side = height // 6
        for t in times:
            frame = background.copy()
            x = int((t % 10.0) / 10.0 * (width - side))
            frame[height // 2 - side // 2: height // 2 + side // 2, x: x + side] = 255
            yield frame

    return write_video(path, frames(), times, fps)


def set_rotation(path: str | Path, degrees: int) -> Path:
    """Mark an `.mp4` written by `write_video` to be shown turned `degrees` clockwise (90, 180 or 270), as a
    phone does: rewrites the display matrix of its video track header (tkhd) in place."""
    fixed = 1 << 16  # 16.16 fixed point
    a, b = {0: (1, 0), 90: (0, 1), 180: (-1, 0), 270: (0, -1)}[degrees]
    data = bytearray(Path(path).read_bytes())
    at = data.index(b"tkhd") + 4
    # version/flags, then times, track id and duration (32- or 64-bit by version), reserved, layer, group,
    # volume, reserved: the matrix follows.
    at += 4 + (32 if data[at] == 1 else 20) + 8 + 8
    data[at: at + 36] = struct.pack(">9i", a * fixed, b * fixed, 0, -b * fixed, a * fixed, 0, 0, 0, 1 << 30)
    Path(path).write_bytes(bytes(data))
    return Path(path)


def _write_h264(path: str | Path, frames, fps: int, bframes: int, retime, fmt: str | None = None,
                keyint: int | None = None) -> Path:
    """Encode `frames` ([H, W, 3] uint8 arrays; frame i at pts i in the time base 1/fps) as H.264 and mux
    the packets that `retime(packets)` returns: it may change their pts/dts or repeat them (as copies)."""
    import av

    frames = list(frames)
    with av.open(str(path), "w", format=fmt) as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = frames[0].shape[1], frames[0].shape[0], "yuv420p"
        options = {"preset": "ultrafast", "bf": str(bframes)}
        if keyint:
            options["keyint"] = options["min-keyint"] = str(keyint)
        stream.options = options
        packets = []
        for i, image in enumerate(frames):
            frame = av.VideoFrame.from_ndarray(image, format="rgb24")
            frame.pts, frame.time_base = i, fractions.Fraction(1, fps)
            packets += stream.encode(frame)
        packets += stream.encode(None)
        for packet in retime(packets):
            container.mux(packet)
    return Path(path)


def _copy_packet(packet, shift: int):
    """A new packet with `packet`'s data and flags, `shift` ticks later (muxing takes a packet's data away)."""
    import av

    out = av.Packet(bytes(packet))
    out.pts, out.dts = packet.pts + shift, packet.dts + shift
    out.time_base, out.stream, out.is_keyframe = packet.time_base, packet.stream, packet.is_keyframe
    return out


def counting_frames(n: int, width: int = 64, height: int = 48) -> list[np.ndarray]:
    """`n` flat grey frames, frame i of brightness 10 + 5 * i (mod 240): which source frame a decoded one is
    can be read from its mean."""
    return [np.full((height, width, 3), 10 + (5 * i) % 240, np.uint8) for i in range(n)]


def write_trimmed_video(path: str | Path, frames, fps: int = 25, skip: int = 3) -> Path:
    """An `.mp4` with B-frames whose edit list starts after its first `skip` frames, as a clip cut without
    re-encoding is: those frames are in the file (the others depend on them) and readers must not show them.

    The first `skip` frames get negative times; the MP4 muxer writes an edit list starting at time 0, and the
    demuxer flags their packets as discarded.
    """
    shift = lambda packets: [_copy_packet(p, -skip) for p in packets]  # noqa: E731
    return _write_h264(path, frames, fps, bframes=3, retime=shift)


def write_repeated_pts_video(path: str | Path, frames, fps: int = 25, at: int = 6) -> Path:
    """A Matroska file (no B-frames) whose frame `at` carries the same pts as the frame before it, as muxers
    that round times to a coarse time base write: every frame is there and decodes, two share one time."""
    def repeat(packets):
        packets = [_copy_packet(p, 0) for p in packets]
        packets[at].pts = packets[at].dts = packets[at - 1].pts
        return packets

    return _write_h264(path, frames, fps, bframes=0, retime=repeat, fmt="matroska")


def make_looped_video(path: str | Path, seconds: float, width: int = 320, height: int = 180, fps: int = 25,
                      loop_seconds: float = 1.0) -> Path:
    """A long video that is quick to write: `loop_seconds` of a square crossing a noisy background are
    encoded once (one closed GOP) and their packets muxed again and again, shifted in time. Decoding it costs
    what any file of that length and size costs (e.g. 10 minutes of 320x180: a few seconds)."""
    rng = np.random.default_rng(0)
    background = np.clip(rng.normal(60, 30, size=(height, width, 3)), 0, 255).astype(np.uint8)
    n = max(1, int(round(loop_seconds * fps)))
    frames = []
    for i in range(n):
        frame = background.copy()
        side = height // 4
        x = int(i / n * (width - side))
        frame[height // 2 - side // 2: height // 2 + side // 2, x: x + side] = 255
        frames.append(frame)
    loops = int(np.ceil(seconds * fps / n))
    again = lambda packets: [_copy_packet(p, k * n) for k in range(loops) for p in packets]  # noqa: E731
    return _write_h264(path, frames, fps, bframes=0, retime=again, keyint=n)


BAD_KINDS = ("zero_byte", "truncated", "not_video", "audio_only", "zero_frames", "corrupt")


def make_bad_files(folder: str | Path, good_example: str | Path | None = None) -> dict[str, Path]:
    """Write one file of each broken kind in `BAD_KINDS` into `folder`; returns kind -> path.

    - zero_byte: an empty `.mp4`;
    - truncated: the first half of a real `.mp4` (its index, written at the end, is gone);
    - not_video: a text file named `.mp4`;
    - audio_only: an `.mp4` with one AAC audio stream and no video;
    - zero_frames: an `.mp4` whose video track lists frames of which none decodes;
    - corrupt: a real `.mp4` whose frame data (after the header) is overwritten with noise.
    """
    import av

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if good_example is None:
        good_example = make_video(folder / "_good.tmp.mp4", CLASSES[0], seconds=2.0, fps=25, size=(64, 64))
    data = Path(good_example).read_bytes()
    out = {kind: folder / f"{kind}.mp4" for kind in BAD_KINDS}

    out["zero_byte"].write_bytes(b"")
    out["truncated"].write_bytes(data[: len(data) // 2])
    out["not_video"].write_text("this is not a video, just text with an .mp4 name\n" * 20)

    with av.open(str(out["audio_only"]), "w") as container:
        stream = container.add_stream("aac", rate=16000)
        stream.layout = "mono"
        samples = (0.2 * np.sin(np.arange(16000) * 2 * np.pi * 440 / 16000)).astype(np.float32)
        frame = av.AudioFrame.from_ndarray(samples[None, :], format="fltp", layout="mono")
        frame.sample_rate = 16000
        container.mux(stream.encode(frame))
        container.mux(stream.encode(None))

    # The mp4 muxer drops a video track without samples, so "zero frames" is the reader's view: a track
    # that lists frames of which none decodes (every frame refers to a keyframe that is not there).
    with av.open(str(out["zero_frames"]), "w") as container:
        stream = container.add_stream("libx264", rate=25)
        stream.width, stream.height, stream.pix_fmt = 64, 64, "yuv420p"
        stream.options = {"preset": "ultrafast", "tune": "zerolatency"}
        noise = np.random.default_rng(1).integers(0, 256, size=(20, 64, 64, 3), dtype=np.uint8)
        packets = []
        for i, image in enumerate(noise):
            frame = av.VideoFrame.from_ndarray(image, format="rgb24")
            frame.pts = i
            packets += stream.encode(frame)
        packets += stream.encode(None)
        for packet in packets:
            if not packet.is_keyframe:
                container.mux(packet)

    # Overwrite everything after the first kilobyte but the index with noise: the file opens and
    # lists its frames, and the frame data cannot be decoded.
    noisy = bytearray(data)
    moov = data.rfind(b"moov")
    end = moov - 4 if moov > 1024 else len(data)
    noisy[1024:end] = np.random.default_rng(0).integers(0, 256, size=end - 1024, dtype=np.uint8).tobytes()
    out["corrupt"].write_bytes(bytes(noisy))

    if Path(good_example).name == "_good.tmp.mp4":
        Path(good_example).unlink()
    return out
